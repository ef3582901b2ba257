"""Offloaded experts: a swapped layer keeps ``expert_slots`` experts in fast memory and the rest in
a slower tier, applied by ``optimize()`` when ``KernelConfig.offload_experts`` asks for it.

- ``offload_experts="host"``: the slow tier is host memory (page-locked for a GPU model, copies
  on a side stream). ``"disk"``: a safetensors-layout file written once at optimize time into
  ``offload_dir`` (or an unlinked temporary file), read into RAM slots, so a CPU model's resident
  memory stays at the slots plus the rest of the model (``layers/expert_store.py``).
- Each step, the layer's :class:`~kernel_moe.layers.slot_cache.SlotCache` maps the distinct
  experts routed to onto slots (copying in the misses, evicting by frequency-and-age or LRU) and
  the fused op runs unchanged on the slot tensors with ``expert_map`` = expert id -> slot (-1 for
  an expert not in this wave). More distinct experts than slots run in waves whose outputs add up.
- Prefetch: the next offloaded MoE layer's router applied to this layer's input predicts its
  experts; up to ``offload_upload_cap`` of them are copied into its slots while this layer
  computes (a background thread on CPU, the side stream on a GPU).
- Inference only: a call that autograd would record raises (the expert weights are not
  Parameters of the model any more, and a backward would have to load every expert again).

The layer gets a child ``offloaded_experts`` whose slot buffers are not in ``state_dict``: the
expert weights leave the model's ``state_dict`` (they are in the store); loading a checkpoint
that holds them writes them into the store. ``restore()`` raises (the originals are released).

Legend: T tokens, H hidden, E experts, S slots, K top-k, N up features, I intermediate.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from kernel_moe.errors import KernelMoEError
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.layers.expert_store import DiskStore, HostStore, SlotMover, Store
from kernel_moe.layers.quantized import release_sources
from kernel_moe.layers.slot_cache import OffloadStats, SlotCache
from kernel_moe.layers.spec import ExpertsSpec
from kernel_moe.layers.weights import get_attr_path
from kernel_moe.ops.experts import run_experts as run_op
from kernel_moe.ops.offload import register_runner
from kernel_moe.routing.topk import route

NAMES = ("up", "down", "up_bias", "down_bias")
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The one background thread that copies prefetched experts on CPU (reads queue in order)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel_moe-offload")
        return _EXECUTOR


class OffloadedExperts(nn.Module):
    """The fast slots of one layer's experts, its slot cache, its store and its stats. ``how``: the
    experts' (Activation, backend, deterministic)."""

    def __init__(self, store: Store, num_slots: int, device: torch.device, config, how: tuple) -> None:
        super().__init__()
        num_experts = store.num_experts
        self.__dict__["store"] = store
        self.how = how
        self.handle = register_runner(self.run)
        self.num_experts, self.num_slots = num_experts, num_slots
        self.tier = config.offload_experts
        for name, (shape, dtype) in store.names.items():
            self.register_buffer(f"{name}_slots", torch.zeros((num_slots, *shape), dtype=dtype, device=device),
                                 persistent=False)
        self.cache = SlotCache(num_experts, num_slots, config.offload_eviction)
        self.mover = SlotMover(store)
        self.stats = OffloadStats()
        self.prefetch = config.offload_prefetch
        self.upload_cap = config.offload_upload_cap if config.offload_upload_cap is not None else num_slots
        self._pending: Future | None = None
        self._cancel = threading.Event()
        self._predicted: set[int] = set()
        self._prefetched: set[int] = set()
        self.__dict__["_next"] = None  # (weakref to the next layer's OffloadedExperts, predictor)

    def slot_tensors(self) -> dict[str, Tensor]:
        """name -> slot tensor [S, ...] of each stored tensor."""
        return {name: getattr(self, f"{name}_slots") for name in self.store.names}

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` moves the slots to the device asked for but keeps the store's dtype (a cast
        would make slots and store disagree)."""
        self._wait_prefetch()
        moved = False
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf.new_empty(0)).device)
                moved = moved or self._buffers[name] is not buf
        if moved:
            self.cache.clear()  # the new slots are empty: refilled on demand
        return self

    def set_next(self, nxt: OffloadedExperts | None, predictor) -> None:
        """Prefetch into ``nxt`` the experts ``predictor(x_TH) -> ids [T, K]`` gives for this layer's input."""
        self.__dict__["_next"] = None if nxt is None else (weakref.ref(nxt), predictor)

    def nbytes(self) -> int:
        """Bytes of the fast slots."""
        return sum(t.numel() * t.element_size() for t in self.slot_tensors().values())

    def describe(self) -> str:
        where = "host memory"
        if isinstance(self.store, DiskStore):
            where = "disk (" + (self.store.path if os.path.exists(self.store.path) else "unlinked temporary file") + ")"
        total = self.store.expert_bytes * self.num_experts
        return (f"experts offloaded to {where}: {self.num_slots} of {self.num_experts} in slots "
                f"({self.nbytes() / 2**20:.1f} of {total / 2**20:.1f} MiB), {self.cache.policy} eviction, "
                f"prefetch {'on' if self.prefetch else 'off'}")

    def _wait_prefetch(self) -> None:
        """Stop the background copies a previous layer started into these slots after the one in
        progress (the step knows what it needs now) and forget the ones not made; re-raises their error."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._cancel.set()
        undone = pending.result()
        self._cancel.clear()
        for e, slot, evicted in undone:
            self.cache.undo(e, slot, evicted)
            self._prefetched.discard(e)
        self.stats.prefetched -= len(undone)
        self.stats.bytes_moved -= len(undone) * self.store.expert_bytes

    def start_prefetch(self, predicted: list[int]) -> None:
        """Copy up to ``upload_cap`` of ``predicted`` (most wanted first) into free or evictable slots,
        in the background: the next forward of this layer waits for them."""
        self._wait_prefetch()
        loads = self.cache.prefetch_plan(predicted, self.upload_cap)
        self._predicted = set(predicted)
        self._prefetched = {e for e, _, _ in loads}
        self.stats.prefetched += len(loads)
        self.stats.bytes_moved += len(loads) * self.store.expert_bytes
        if not loads:
            return
        mover, cancel, slots = self.mover, self._cancel, self.slot_tensors()
        if mover.asynchronous(slots):
            for e, slot, _ in loads:
                mover.load(e, slot, slots)
            return

        def copy() -> list[tuple[int, int, int | None]]:
            for i, (e, slot, _) in enumerate(loads):
                if cancel.is_set():
                    return loads[i:]
                mover.load(e, slot, slots)
            return []

        self._pending = _executor().submit(copy)

    def _account(self, needed: list[int], tokens: int) -> None:
        s = self.stats
        used = set(needed)
        s.steps += 1
        s.tokens += tokens
        s.needed += len(needed)
        s.predicted += len(self._predicted)
        s.predicted_used += len(self._predicted & used)
        s.prefetch_used += len(self._prefetched & used)
        self._predicted, self._prefetched = set(), set()

    def _prefetch_next(self, x_TH: Tensor) -> None:
        if not self.prefetch or self.__dict__["_next"] is None:
            return
        ref, predictor = self.__dict__["_next"]
        nxt = ref()
        if nxt is None:
            return
        with torch.no_grad():
            ids = predictor(x_TH).reshape(-1)
        counts = torch.bincount(ids[(ids >= 0) & (ids < nxt.num_experts)], minlength=nxt.num_experts)
        order = torch.argsort(counts, descending=True, stable=True)
        wanted = order[: int((counts > 0).sum())].tolist()
        nxt.start_prefetch(wanted)

    def forward(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor) -> Tensor:
        """[T, H] -> [T, H]: the routed experts, run from the slots; inside a compiled graph as the
        opaque op ``kernel_moe::offloaded_experts``."""
        if torch.is_grad_enabled() and (x_TH.requires_grad or weights_TK.requires_grad):
            raise KernelMoEError("offloaded experts are inference-only (offload_experts="
                                 f"{self.tier!r}): run the model under torch.no_grad() or torch.inference_mode(); "
                                 "training needs the experts in the model (offload_experts=None)")
        if torch.compiler.is_compiling():
            return torch.ops.kernel_moe.offloaded_experts(x_TH, weights_TK, ids_TK, self.handle)
        return self.run(x_TH, weights_TK, ids_TK)

    def run(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor) -> Tensor:
        """The routed experts from the slots (in waves when the step routes to more distinct experts
        than there are slots)."""
        self._wait_prefetch()
        distinct = torch.unique(ids_TK)
        needed = [e for e in distinct.tolist() if 0 <= e < self.num_experts]
        self._account(needed, x_TH.shape[0])
        waves = self.cache.plan(needed)
        self.stats.hits += sum(1 for e, _, load in waves[0] if not load)
        self.stats.extra_waves += len(waves) - 1
        out_TH = None
        for i, wave in enumerate(waves):
            for e, slot, load in wave:
                if load:
                    self.mover.load(e, slot, self.slot_tensors())
                    self.stats.loads += 1
                    self.stats.bytes_moved += self.store.expert_bytes
            if i == 0:
                self._prefetch_next(x_TH)  # the next layer's copies overlap this layer's compute
            y_TH = self._run_wave(x_TH, weights_TK, ids_TK, wave)
            if len(waves) > 1:
                y_TH = y_TH.float()  # waves add up in fp32 and round once
            out_TH = y_TH if out_TH is None else out_TH + y_TH
        return out_TH.to(x_TH.dtype)

    def _run_wave(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor, wave) -> Tensor:
        """The fused op on the slots with expert_map [E] = slot of each expert of ``wave``, -1 elsewhere."""
        activation, backend, deterministic = self.how
        slots = [slot for _, slot, _ in wave]
        self.mover.ready(slots)
        map_E = torch.full((self.num_experts,), -1, dtype=torch.int64)
        map_E[[e for e, _, _ in wave]] = torch.tensor(slots, dtype=torch.int64)
        t = self.slot_tensors()
        experts = StackedExperts(t["up"], t["down"], t.get("up_bias"), t.get("down_bias"), activation,
                                 expert_map=map_E.to(x_TH.device, non_blocking=True))
        y_TH = run_op(x_TH, weights_TK, ids_TK, experts, backend, deterministic)
        self.mover.used(slots)
        return y_TH


def _expert_tensors(layer: nn.Module, ex: ExpertsSpec) -> dict[str, Tensor]:
    """name -> [E, ...] of each expert tensor the layer has (views)."""
    up = ex.up.get(layer)
    full = {"up": up[: ex.num_experts], "down": ex.down.get(layer)}  # an up weight may hold weightless experts' rows
    if ex.up_bias is not None:
        full["up_bias"] = ex.up_bias.get(layer)
    if ex.down_bias is not None:
        full["down_bias"] = ex.down_bias.get(layer)
    return full


def _store(config, full: dict[str, Tensor], name: str) -> Store:
    """The slow tier the config asks for, filled from ``full``."""
    names = {n: (tuple(t.shape[1:]), t.dtype) for n, t in full.items()}
    E = full["up"].shape[0]
    get = lambda n, e: full[n][e]  # noqa: E731
    if config.offload_experts == "host":
        return HostStore(names, E, get, pin=full["up"].device.type == "cuda")
    if config.offload_dir is not None:
        os.makedirs(config.offload_dir, exist_ok=True)
        store = DiskStore(os.path.join(config.offload_dir, f"{name or 'model'}.experts.safetensors"), names, E, get)
        return store
    fd, path = tempfile.mkstemp(prefix="kernel_moe-experts-", suffix=".safetensors")
    os.close(fd)
    try:
        store = DiskStore(path, names, E, get)
    finally:
        os.unlink(path)  # the open descriptor keeps the file until the store closes (or the process ends)
    return store


def offload_layer(layer: nn.Module, config, name: str) -> str:
    """Move the experts of a swapped layer (module ``name`` of the model) into the slow tier the
    config names, keeping ``config.expert_slots`` slots; returns the report's note. Raises
    KernelMoEError when the layer must keep its original weights."""
    spec = layer.spec
    if spec.training_fallback or spec.gradient_fallback:
        raise KernelMoEError("its original module must keep running in training or under autograd "
                             f"({spec.training_fallback or spec.gradient_fallback}), and offloading would release "
                             "its expert weights")
    if getattr(spec, "scale_inputs", False):
        raise KernelMoEError("its routing weights scale the experts' inputs, which offloaded experts do not run")
    ex = spec.experts
    if ex.post_norm is not None:
        raise KernelMoEError("its experts normalise each output (post-expert norm), which offloaded experts do not run")
    with torch.no_grad():
        full = _expert_tensors(layer, ex)
        store = _store(config, full, name)
    device = full["up"].device
    del full
    slots = min(config.expert_slots, ex.num_experts)
    how = (ex.activation, layer.backend, layer.deterministic)
    layer.offloaded_experts = OffloadedExperts(store, slots, device, config, how)
    release_sources(layer, ex.sources())
    layer.original_released = True
    layer._register_load_state_dict_pre_hook(_store_on_load, with_module=True)
    return layer.offloaded_experts.describe()


def _store_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict of a checkpoint that holds the offloaded expert weights: they are written
    into the store (and removed from ``state_dict``); the slots are refilled on demand."""
    off: OffloadedExperts = module.offloaded_experts
    ex = module.spec.experts
    sources = dict(zip(NAMES, (ex.up, ex.down, ex.up_bias, ex.down_bias)))
    for name, source in sources.items():
        if source is None or not all(prefix + p in state_dict for p in source.paths()):
            continue
        full = source.assemble(lambda p: state_dict.pop(prefix + p))
        off._wait_prefetch()
        for e in range(off.num_experts):
            off.store.write(name, e, full[e])
        off.cache.clear()


def predictor(layer: nn.Module):
    """x [T, H] -> the expert ids [T, K] ``layer`` (a fused MoE block) would route it to (its own
    routing, selection bias included; no routing features)."""
    ref = weakref.ref(layer)

    def predict(x_TH: Tensor) -> Tensor:
        moe = ref()
        if moe is None:  # the layer is gone: predict nothing
            return torch.empty(0, dtype=torch.int64, device=x_TH.device)
        r = moe.spec.router
        bias = get_attr_path(moe, r.selection_bias) if r.selection_bias else None
        if getattr(moe, "expert_bias", None) is not None:
            bias = moe.expert_bias if bias is None else bias + moe.expert_bias
        return route(moe.router_logits(x_TH), r.routing, bias)[1]

    return predict


def link_prefetch(layers: list[nn.Module]) -> None:
    """Each offloaded layer of ``layers`` (in forward order) prefetches for the next one when that
    one has a router over the same hidden size."""
    offloaded = [m for m in layers if getattr(m, "offloaded_experts", None) is not None]
    for cur, nxt in zip(offloaded, offloaded[1:]):
        same = getattr(nxt, "hidden_size", None) == cur.spec.experts.hidden
        routed = same and hasattr(nxt, "router_logits")
        cur.offloaded_experts.set_next(nxt.offloaded_experts if routed else None, predictor(nxt) if routed else None)


def offload_stats(model: nn.Module) -> dict[str, OffloadStats]:
    """Module name -> the stats of each offloaded layer of ``model`` ("total": their sum)."""
    found = {name or "<root>": m.offloaded_experts.stats for name, m in model.named_modules()
             if getattr(m, "offloaded_experts", None) is not None}
    if found:
        found["total"] = sum(found.values(), OffloadStats())
    return found


__all__ = ["OffloadedExperts", "link_prefetch", "offload_layer", "offload_stats", "predictor"]
