"""KernelConfig: what the user asks kernel_moe to do, validated when it is built.

A frozen dataclass: every field is checked in ``__post_init__`` and a bad value raises
``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

QUANTIZED_FORMATS = ("int8", "fp8", "int4")  # weight-only expert formats (kernels/quantization.py)
INT4_GROUP_SIZES = (32, 64, 128)
BACKENDS = ("auto", "triton", "cpu")
DEPRECATED_BACKENDS = {"torch": "cpu"}
LOAD_BALANCING = ("none", "auxiliary_loss", "dynamic")
CAPACITY_PRIORITIES = ("score", "position")
ROUTING_MODES = ("token_choice", "expert_choice")
OFFLOAD_TIERS = ("host", "disk")  # where offloaded experts live (layers/offload.py)
OFFLOAD_EVICTIONS = ("frequency", "lru")  # slot eviction policies (layers/slot_cache.py)
EXPERT_PARALLEL_MODES = ("exact", "padded")


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"KernelConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _check_int(field: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"an int >= {minimum}" + (" or None" if optional else ""))


def _check_float(field: str, value: object, minimum: float, strict: bool, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        _fail(field, value, f"a finite number {bound}" + (" or None" if optional else ""))


@dataclass(frozen=True)
class KernelConfig:
    """Configuration of :class:`kernel_moe.UnifiedManager`.

    - ``num_experts`` / ``top_k``: what the user expects to find in each MoE module. ``None``
      takes them from the module; a module whose value differs is skipped with that reason
      (never silently re-routed).
    - ``capacity_factor``: ``None`` is dropless. A number caps each expert at
      ``ceil(capacity_factor * T * k / E)`` tokens (at least ``min_capacity``); tokens over
      capacity are dropped in ``capacity_priority`` order ("score" or "position").
    - ``routing``: "token_choice" (each token picks top_k experts, the original block's
      routing) or "expert_choice" (each expert picks its top-capacity tokens).
    - ``load_balancing``: "none", "auxiliary_loss" (Switch load-balancing loss and router
      z-loss, weighted by ``aux_loss_weight`` / ``z_loss_weight``) or "dynamic" (aux-loss-free
      per-expert selection bias updated at ``bias_update_rate``).
    - ``router_jitter``: multiplicative router-input noise in training only (0 disables).
    - ``random_routing``: in training, with this probability a token's last slot goes to a
      uniformly random expert it did not choose (weighted by the router's score for it), so every
      expert keeps getting a training signal; drawn from torch's global RNG (``torch.manual_seed``
      makes it reproducible) and counted in ``FusedMoE.randomly_routed``. 0 disables.
    - ``quantize_experts``: None (full precision) or "int8" / "fp8" / "int4": weight-only
      quantization of every swapped MoE's experts (``layers/quantized.py``); the full-precision
      expert weights are released unless ``quantize_keep_original``. ``quantize_group_size``: None
      for one scale per output row (int8, fp8), or 32 / 64 / 128 input features per scale (int4:
      default 128). ``quantize_hot_experts``: per layer, this many of the experts that calibration
      batches (``optimize(model, calibration=...)``) route the most slots to stay in full precision
      (004's "quantize inactive experts"); 0 quantizes every expert.
    - ``offload_experts``: None (every expert stays where the model has it), "host" or "disk":
      each swapped MoE keeps ``expert_slots`` experts in fast slots (on the model's device) and
      the rest in the slow tier, copied into a slot when routed to (``layers/offload.py``).
      "host": host memory (page-locked for a GPU model; copies on a side stream). "disk": a
      safetensors-layout file per layer written at optimize time into ``offload_dir`` (None: an
      unlinked temporary file), read into RAM slots, so a CPU model's resident memory stays at the
      slots plus the non-expert weights. Inference only; not combined with ``quantize_experts``.
    - ``expert_slots``: slots per layer (an int >= 1, capped at the layer's expert count); required
      with ``offload_experts``, None without.
    - ``offload_eviction``: "frequency" (use counts that decay with age) or "lru".
    - ``offload_prefetch``: predict the next offloaded layer's experts with its router on this
      layer's input and copy them while this layer computes.
    - ``offload_upload_cap``: at most this many prefetch copies per layer per step (None: the slot
      count); the copies a step needs are never capped, its outputs stay exact.
    - ``expert_parallel``: shard every swapped MoE's experts over the ranks of a process group
      (``optimize(model, process_group=...)``, default the whole world; torch.distributed must be
      initialised): each rank keeps a contiguous E / world share and tokens travel by all-to-all.
      ``expert_parallel_mode``: "exact" (per-rank counts exchanged and read on the host: eager
      inference and training, any token count per rank) or "padded" (fixed buffers of
      ``ceil(expert_parallel_capacity_factor * T * k / world)`` rows per rank pair, overflow
      dropped and counted, no host read: ``torch.compile(fullgraph=True)`` and CUDA graphs; the
      same token count on every rank).
    - ``backend``: "auto" (Triton kernels on CUDA, the CPU backend elsewhere), "triton" (always
      the Triton kernels; on CPU tensors only with TRITON_INTERPRET=1) or "cpu" (the CPU backend:
      native CPU kernels on CPU tensors, its PyTorch path on any device). "torch" is the
      deprecated name of "cpu".
    - ``swap_moe`` / ``swap_ffn``: which module kinds are swapped (dense FFNs are opt-in).
    - ``verify``: prove each candidate equivalent on a probe input before swapping it;
      ``verify_tokens`` is the probe size.
    - ``deterministic``: a fixed reduction order on the GPU (no atomics).
    """

    num_experts: int | None = None
    top_k: int | None = None
    capacity_factor: float | None = None
    min_capacity: int = 0
    capacity_priority: str = "score"
    routing: str = "token_choice"
    load_balancing: str = "none"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    bias_update_rate: float = 1e-3
    router_jitter: float = 0.0
    random_routing: float = 0.0
    quantize_experts: str | None = None
    quantize_group_size: int | None = None
    quantize_keep_original: bool = False
    offload_experts: str | None = None
    expert_slots: int | None = None
    offload_dir: str | None = None
    offload_eviction: str = "frequency"
    offload_prefetch: bool = True
    offload_upload_cap: int | None = None
    quantize_hot_experts: int = 0
    expert_parallel: bool = False
    expert_parallel_mode: str = "exact"
    expert_parallel_capacity_factor: float = 2.0
    backend: str = "auto"
    swap_moe: bool = True
    swap_ffn: bool = False
    verify: bool = True
    verify_tokens: int = 16
    deterministic: bool = True

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts, 1, optional=True)
        _check_int("top_k", self.top_k, 1, optional=True)
        if self.num_experts is not None and self.top_k is not None and self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"an int in [1, num_experts={self.num_experts}]")
        _check_float("capacity_factor", self.capacity_factor, 0.0, strict=True, optional=True)
        _check_int("min_capacity", self.min_capacity, 0)
        if self.capacity_priority not in CAPACITY_PRIORITIES:
            _fail("capacity_priority", self.capacity_priority, ", ".join(CAPACITY_PRIORITIES))
        if self.routing not in ROUTING_MODES:
            _fail("routing", self.routing, ", ".join(ROUTING_MODES))
        if self.load_balancing not in LOAD_BALANCING:
            _fail("load_balancing", self.load_balancing, ", ".join(LOAD_BALANCING))
        _check_float("aux_loss_weight", self.aux_loss_weight, 0.0, strict=False)
        _check_float("z_loss_weight", self.z_loss_weight, 0.0, strict=False)
        _check_float("bias_update_rate", self.bias_update_rate, 0.0, strict=False)
        _check_float("router_jitter", self.router_jitter, 0.0, strict=False)
        if self.router_jitter >= 1.0:
            _fail("router_jitter", self.router_jitter, "a number in [0, 1)")
        if self.quantize_experts not in (None, *QUANTIZED_FORMATS):
            _fail("quantize_experts", self.quantize_experts, "None, " + ", ".join(QUANTIZED_FORMATS))
        if self.quantize_group_size not in (None, *INT4_GROUP_SIZES):
            _fail("quantize_group_size", self.quantize_group_size, "None, " + ", ".join(map(str, INT4_GROUP_SIZES)))
        if self.quantize_experts is None and self.quantize_group_size is not None:
            _fail("quantize_group_size", self.quantize_group_size, "None when quantize_experts is None")
        _check_int("quantize_hot_experts", self.quantize_hot_experts, 0)
        if self.quantize_experts is None and self.quantize_hot_experts:
            _fail("quantize_hot_experts", self.quantize_hot_experts, "0 when quantize_experts is None")
        _check_float("random_routing", self.random_routing, 0.0, strict=False)
        if self.random_routing >= 1.0:
            _fail("random_routing", self.random_routing, "a probability in [0, 1)")
        self._check_offload()
        if not isinstance(self.expert_parallel, bool):
            _fail("expert_parallel", self.expert_parallel, "True or False")
        if self.expert_parallel_mode not in EXPERT_PARALLEL_MODES:
            _fail("expert_parallel_mode", self.expert_parallel_mode, ", ".join(EXPERT_PARALLEL_MODES))
        _check_float("expert_parallel_capacity_factor", self.expert_parallel_capacity_factor, 0.0, strict=True)
        if not self.expert_parallel and self.expert_parallel_mode != "exact":
            _fail("expert_parallel_mode", self.expert_parallel_mode, "'exact' (the default) when expert_parallel=False")
        if self.expert_parallel and self.quantize_experts is not None:
            _fail("quantize_experts", self.quantize_experts, "None when expert_parallel=True (quantized experts are "
                  "not sharded in this version)")
        if self.backend in DEPRECATED_BACKENDS:
            new = DEPRECATED_BACKENDS[self.backend]
            warnings.warn(f"KernelConfig.backend={self.backend!r} is deprecated; use {new!r}", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(self, "backend", new)
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, ", ".join(BACKENDS))
        for name in ("swap_moe", "swap_ffn", "verify", "deterministic", "quantize_keep_original", "offload_prefetch"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if not (self.swap_moe or self.swap_ffn):
            _fail("swap_moe", self.swap_moe, "True when swap_ffn is False (otherwise nothing can be swapped)")
        _check_int("verify_tokens", self.verify_tokens, 1)

    def _check_offload(self) -> None:
        if self.offload_experts not in (None, *OFFLOAD_TIERS):
            _fail("offload_experts", self.offload_experts, "None, " + ", ".join(map(repr, OFFLOAD_TIERS)))
        if self.offload_experts is None:
            for name in ("expert_slots", "offload_dir", "offload_upload_cap"):
                if getattr(self, name) is not None:
                    _fail(name, getattr(self, name), "None when offload_experts is None")
        else:
            if self.expert_slots is None:
                _fail("expert_slots", None, f"an int >= 1 when offload_experts={self.offload_experts!r}")
            _check_int("expert_slots", self.expert_slots, 1)
            if self.quantize_experts is not None:
                _fail("quantize_experts", self.quantize_experts,
                      "None when offload_experts is set (offloading quantized experts is not available)")
            if self.expert_parallel is True:
                _fail("expert_parallel", self.expert_parallel,
                      "False when offload_experts is set (offloading sharded experts is not available)")
        if self.offload_dir is not None and (not isinstance(self.offload_dir, str) or not self.offload_dir):
            _fail("offload_dir", self.offload_dir, "a directory path (str) or None")
        if self.offload_dir is not None and self.offload_experts != "disk":
            _fail("offload_dir", self.offload_dir, "None unless offload_experts='disk'")
        if self.offload_eviction not in OFFLOAD_EVICTIONS:
            _fail("offload_eviction", self.offload_eviction, ", ".join(OFFLOAD_EVICTIONS))
        _check_int("offload_upload_cap", self.offload_upload_cap, 1, optional=True)

    @classmethod
    def for_moe(
        cls,
        num_experts: int | None = None,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        load_balancing: str = "none",
        router_jitter: float = 0.0,
        expert_parallel: bool = False,
        backend: str = "auto",
        **kwargs: object,
    ) -> KernelConfig:
        """A config that swaps MoE modules (dense FFNs untouched unless ``swap_ffn=True``)."""
        return cls._build(
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            load_balancing=load_balancing,
            router_jitter=router_jitter,
            expert_parallel=expert_parallel,
            backend=backend,
            **kwargs,
        )

    @classmethod
    def for_ffn(cls, backend: str = "auto", swap_moe: bool = False, **kwargs: object) -> KernelConfig:
        """A config that swaps dense FFN modules (Linear -> act -> Linear, SwiGLU gate/up/down)."""
        return cls._build(backend=backend, swap_moe=swap_moe, swap_ffn=True, **kwargs)

    @classmethod
    def _build(cls, **kwargs: object) -> KernelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"KernelConfig has no field {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> KernelConfig:
        """A copy with some fields changed (validated again)."""
        return self._build(**{**dataclasses.asdict(self), **changes})
