"""UnifiedManager: walk a model, prove and swap recognized MoE modules, report, restore."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from kernel_moe.adapters import registered_adapters
from kernel_moe.adapters.base import Adapter, Skip
from kernel_moe.adapters.extras import PROBES, prove_tuple
from kernel_moe.adapters.probe import (
    PROBE_SEED,
    first_match,
    gradients_mismatch,
    outputs_mismatch,
    probe_input,
    returns_kind,
    run_reference,
)
from kernel_moe.adapters.state import restore_state, saved_state, training_state_changes
from kernel_moe.config import KernelConfig
from kernel_moe.errors import KernelMoEError, UnsupportedModuleError
from kernel_moe.layers import SwappedLayer
from kernel_moe.layers.calibration import count_routing
from kernel_moe.layers.expert_parallel import shard_layer
from kernel_moe.layers.offload import link_prefetch, offload_layer
from kernel_moe.layers.quantized import check_quantizable, quantize_layer
from kernel_moe.layers.spec import FFNSpec, SwapSpec
from kernel_moe.layers.weights import get_attr_path
from kernel_moe.kernels import resolve_backend
from kernel_moe.parallel.group import expert_group
from kernel_moe.report import OptimizeReport, SkipRecord, SwapRecord

logger = logging.getLogger("kernel_moe")

FilterFn = Callable[[nn.Module, str], bool]
FUSED_LAYERS = (SwappedLayer,)


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b))
    return False


class UnifiedManager:
    """Swaps recognized MoE modules of a model for kernel_moe's fused layers.

    >>> manager = UnifiedManager(KernelConfig.for_moe(top_k=2))
    >>> model = manager.optimize(model)       # in place; a recognised MoE block itself becomes the fused layer
    >>> print(manager.report)                 # what the last optimize() swapped and skipped, and why
    >>> model = manager.restore(model)        # the original modules again
    """

    def __init__(self, config: KernelConfig | None = None, adapters: list[Adapter] | None = None) -> None:
        if config is not None and not isinstance(config, KernelConfig):
            raise ValueError(f"config must be a KernelConfig, got {type(config).__name__}")
        self.config = config if config is not None else KernelConfig.for_moe()
        self.adapters = list(adapters) if adapters is not None else registered_adapters()
        self.report = OptimizeReport()
        self._group = None

    def optimize(self, model: nn.Module, filter_fn: FilterFn | None = None, strict: bool = False,
                 calibration: Iterable | None = None, process_group: object = None) -> nn.Module:
        """Swap every recognized, proven-equivalent module in place and return the optimized model:
        the same object when modules inside it were swapped, the fused layer when ``model`` itself
        is a recognized MoE block. What was swapped and skipped, and why, is ``self.report``.

        ``filter_fn(module, fqn)`` returning False leaves a module alone. With ``strict=True``
        a candidate that cannot be swapped raises UnsupportedModuleError instead of being skipped.
        ``calibration``: model inputs (tensors, tuples of arguments or dicts of keyword arguments)
        run once after swapping to count each layer's routing; needed by
        ``KernelConfig.quantize_hot_experts``. With ``KernelConfig.expert_parallel``, every swapped
        MoE keeps only this rank's share of its experts in ``process_group`` (a ProcessGroup or a
        one-dimensional DeviceMesh; None: the whole world), after its equivalence was proven on all
        of them.
        """
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self.config.quantize_hot_experts and calibration is None:
            raise ValueError(f"KernelConfig.quantize_hot_experts={self.config.quantize_hot_experts} keeps the most "
                             "routed experts in full precision and needs calibration batches: "
                             "optimize(model, calibration=[inputs, ...])")
        self._group = self._expert_group(process_group)
        report = self.report = OptimizeReport()
        result = model
        done: list[str] = []
        layers: list[nn.Module] = []
        for fqn, module in list(model.named_modules()):
            if "" in done:
                break  # the model itself was swapped: nothing inside it is left to visit
            if any(fqn.startswith(p + ".") for p in done):
                continue
            if isinstance(module, FUSED_LAYERS):
                report.already_optimized.append(fqn or "<root>")
                done.append(fqn)
                continue
            if filter_fn is not None and not filter_fn(module, fqn):
                continue
            outcome = self._convert(module, fqn)
            if outcome is None:
                continue
            if isinstance(outcome, Skip):
                self._skip(report, fqn, module, outcome.reason, strict)
                continue
            layers.append(outcome)
            if fqn == "":
                result = outcome  # the model itself is the block: the fused layer replaces it
            else:
                parent_name, _, child_name = fqn.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, outcome)
            done.append(fqn)
            report.swapped.append(SwapRecord(
                name=fqn or "<root>",
                original_class=type(module).__name__,
                new_class=type(outcome).__name__,
                num_experts=outcome.num_experts,
                top_k=outcome.top_k,
                parameters=sum(p.numel() for p in module.parameters()),
                details=outcome.details(),
            ))
        link_prefetch(layers)
        if self.config.quantize_hot_experts:
            self._quantize_calibrated(result, report, calibration)
        logger.info(report.summary())
        return result

    def convert(self, module: nn.Module, process_group: object = None) -> nn.Module:
        """The fused layer for one MoE module (not placed anywhere); raises if it cannot be swapped.
        ``process_group``: as in :meth:`optimize`."""
        self._group = self._expert_group(process_group)
        outcome = self._convert(module)
        if outcome is None:
            raise UnsupportedModuleError(f"{type(module).__name__} is not recognized as an MoE module")
        if isinstance(outcome, Skip):
            raise UnsupportedModuleError(f"{type(module).__name__}: {outcome.reason}")
        return outcome

    @staticmethod
    def restore(model: nn.Module) -> nn.Module:
        """Put the original modules back in place of every fused layer and return the model (the
        original module when ``model`` itself is a fused layer)."""
        fused = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, FUSED_LAYERS)]
        sharded = [fqn or "<root>" for fqn, m in fused if m.expert_parallel is not None]
        if sharded:
            raise KernelMoEError(f"cannot restore {', '.join(sharded)}: expert parallelism sharded their experts "
                                 "(each rank holds its share only); build the model again to get the original")
        released = [fqn or "<root>" for fqn, m in fused if m.original_released]
        if released:
            raise KernelMoEError(f"cannot restore {', '.join(released)}: quantize_experts or offload_experts released "
                                 "the original expert weights; optimize with quantize_keep_original=True (quantized) "
                                 "or without offload_experts to be able to restore")
        if isinstance(model, FUSED_LAYERS):
            return model.original
        for fqn, module in fused:
            if fqn:
                parent_name, _, child_name = fqn.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, module.original)
        return model

    def _skip(self, report: OptimizeReport, fqn: str, module: nn.Module, reason: str, strict: bool) -> None:
        if strict:
            raise UnsupportedModuleError(f"{fqn} ({type(module).__name__}): {reason}")
        report.skipped.append(SkipRecord(fqn, type(module).__name__, reason))

    def _convert(self, module: nn.Module, fqn: str = "") -> nn.Module | Skip | None:
        """Ask each adapter; prove its candidates; build the first proven spec's layer once,
        with everything the config asks for (``fqn``: the module's name, for offload files)."""
        reasons = []
        for adapter in self.adapters:
            candidates = adapter.candidates(module, self.config)
            if candidates is None:
                continue
            if isinstance(candidates, Skip):
                reasons.append(candidates.reason)
                continue
            spec = self._prove(module, candidates)
            if isinstance(spec, Skip):
                reasons.append(spec.reason)
                continue
            try:
                layer = spec.build(module, self.config)
            except ValueError as exc:  # a routing feature of the config that cannot apply to this block
                reasons.append(str(exc))
                continue
            layer = self._sharded(self._quantized(layer))
            return layer if isinstance(layer, Skip) else self._offloaded(layer, fqn)
        return Skip("; ".join(reasons)) if reasons else None

    def _expert_group(self, process_group: object):
        """The group expert parallelism shards over (None without it). Raises ValueError when a group
        is given without ``expert_parallel``, or torch.distributed is not initialised."""
        if not self.config.expert_parallel:
            if process_group is not None:
                raise ValueError(f"process_group={process_group!r} is given but KernelConfig.expert_parallel=False; "
                                 "allowed: None, or a config with expert_parallel=True")
            return None
        return expert_group(process_group)

    def _sharded(self, layer: nn.Module | Skip) -> nn.Module | Skip:
        """The layer with this rank's share of its experts when the config asks for expert
        parallelism (MoE blocks and experts modules; dense FFNs stay replicated). An uneven split
        raises ValueError naming the numbers."""
        if self._group is None or isinstance(layer, Skip) or isinstance(layer.spec, FFNSpec):
            return layer
        cfg = self.config
        try:
            shard_layer(layer, self._group, cfg.expert_parallel_mode, cfg.expert_parallel_capacity_factor)
        except KernelMoEError as exc:
            return Skip(f"expert_parallel cannot apply: {exc}")
        return layer

    def _quantized(self, layer: nn.Module) -> nn.Module | Skip:
        """The layer with its experts quantized when the config asks (MoE blocks and experts
        modules; dense FFNs stay as they are)."""
        cfg = self.config
        if cfg.quantize_experts is None or isinstance(layer.spec, FFNSpec) or not getattr(layer.spec, "quantizable",
                                                                                           True):
            return layer
        try:
            if cfg.quantize_hot_experts:  # quantized after calibration (see _quantize_calibrated)
                check_quantizable(layer, cfg.quantize_experts, cfg.quantize_group_size, cfg.quantize_keep_original)
                layer.awaits_calibration = True
            else:
                layer.quantization_note = quantize_layer(layer, cfg.quantize_experts, cfg.quantize_group_size,
                                                         cfg.quantize_keep_original)
        except KernelMoEError as exc:
            return Skip(f"quantize_experts={cfg.quantize_experts!r} cannot apply: {exc}")
        return layer

    def _offloaded(self, layer: nn.Module, fqn: str) -> nn.Module | Skip:
        """The layer with its experts offloaded when the config asks (MoE blocks and experts
        modules; dense FFNs stay as they are)."""
        cfg = self.config
        if cfg.offload_experts is None or isinstance(layer.spec, FFNSpec):
            return layer
        try:
            layer.offload_note = offload_layer(layer, cfg, fqn)
        except KernelMoEError as exc:
            return Skip(f"offload_experts={cfg.offload_experts!r} cannot apply: {exc}")
        return layer

    def _quantize_calibrated(self, model: nn.Module, report: OptimizeReport, calibration: Iterable) -> None:
        """Run the calibration inputs, then quantize each waiting layer's experts but the
        ``quantize_hot_experts`` it routed the most slots to; the report's details say which."""
        cfg = self.config
        layers = {fqn or "<root>": m for fqn, m in model.named_modules() if getattr(m, "awaits_calibration", False)}
        counts = count_routing(model, list(layers.values()), calibration)
        for record_index, record in enumerate(report.swapped):
            layer = layers.get(record.name)
            if layer is None:
                continue
            n = min(cfg.quantize_hot_experts, layer.num_experts)
            hot = counts[layer].topk(n).indices if n < layer.num_experts else None
            if hot is None:
                layer.quantization_note = f"every expert kept in full precision (quantize_hot_experts={n})"
            else:
                share = counts[layer][hot].sum().item() / max(1, counts[layer].sum().item())
                note = quantize_layer(layer, cfg.quantize_experts, cfg.quantize_group_size,
                                      cfg.quantize_keep_original, hot)
                layer.quantization_note = f"{note}; the hot experts took {share:.0%} of the calibration slots"
            layer.awaits_calibration = False
            report.swapped[record_index] = dataclasses.replace(record, details=layer.details())

    def _prove(self, module: nn.Module, specs: list[SwapSpec]) -> SwapSpec | Skip:
        """The first candidate whose layer computes what ``module`` computes on a probe, with
        the fallbacks its training forward and gradients call for; or why there is none. A spec
        kind with its own ``prove`` (an attention layer, probed with masks and rotary embeddings)
        proves itself."""
        if callable(getattr(specs[0], "prove", None)):
            return specs[0].prove(module, self.config)
        like = _weight_like(module, specs[0])
        if like.device.type != "meta":
            resolve_backend(self.config.backend, like.device)  # an unusable backend is the user's error: raise
        if not self.config.verify:
            why = specs[0].unexpected(self.config)
            return Skip(why) if why else specs[0]
        if like.device.type == "meta":
            return Skip("parameters are on the meta device, so equivalence cannot be verified")

        def draw(shape: tuple[int, ...], offset: int) -> torch.Tensor:
            return probe_input(shape, like, seed=PROBE_SEED + offset)

        options = specs[0].probe_args(self.config.verify_tokens, draw)
        found = run_reference(module, options)
        if isinstance(found, str):
            return Skip(f"the original forward failed on a probe input ({found[:200]})")
        args, ref = found
        # the proof is of the original routing: the config's routing features are off here
        plain = KernelConfig(backend=self.config.backend, deterministic=self.config.deterministic)
        if isinstance(ref, tuple):
            index = next(i for i, option in enumerate(options) if option is args)
            proven = prove_tuple(specs, ref, [args] + self._more_probes(specs[0], index, like),
                                 lambda s: s.build(module, plain), module)
            if isinstance(proven, Skip):
                return proven
            spec, layer = proven
        else:
            kind = returns_kind(ref, args[0])
            if kind is None or specs[0].returning(kind) is None:
                return Skip(f"forward returns {type(ref).__name__} that the fused layer cannot reproduce")
            match = first_match([s.returning(kind) for s in specs], lambda s: s.build(module, plain), ref, args)
            if match.candidate is None:
                return Skip("not proven equivalent: " + match.reason(400))
            spec, layer = match.candidate, match.module
        why = spec.unexpected(self.config)
        if why is not None:
            return Skip(why)
        saved = saved_state(module)
        try:
            training = self._state_check(module, args, saved) or self._training_check(module, layer, args)
            gradient = self._gradient_check(module, layer, args, train=training is None)
        finally:
            restore_state(module, saved)  # the probes' training forwards leave the module as it was
        return spec.with_fallbacks(training, gradient)

    @staticmethod
    def _state_check(module: nn.Module, args: tuple, saved: dict) -> str | None:
        """The reason training must run the original when its training forward updates the module's
        own state (routing counts, accumulated losses), which the fused layer does not; else None."""
        try:
            changed = training_state_changes(module, args, saved)
        except Exception as exc:
            return f"its training forward could not be checked for state updates ({type(exc).__name__})"
        if not changed:
            return None
        return (f"its training forward updates the module's own state ({', '.join(changed[:4])}), which the fused "
                "layer does not")

    def _more_probes(self, spec: SwapSpec, index: int, like: torch.Tensor) -> list[tuple]:
        """Probe arguments of the form ``spec.probe_args(...)[index]`` beside the first, with other
        seeds and other token counts, for what one probe cannot settle (the extras of a tuple)."""
        probes = []
        for n in range(1, PROBES):
            def draw(shape: tuple[int, ...], offset: int, n: int = n) -> torch.Tensor:
                return probe_input(shape, like, seed=PROBE_SEED + 1000 * n + offset)

            probes.append(spec.probe_args(self.config.verify_tokens + 5 * n, draw)[index])
        return probes

    @staticmethod
    def _training_check(module: nn.Module, layer: nn.Module, args: tuple) -> str | None:
        """None when the fused layer reproduces the original's training-mode forward too,
        else the reason training steps must run the original module."""
        flags = [(m, m.training) for m in module.modules()]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                module.train()
                torch.manual_seed(1)
                first = module(*args)
                torch.manual_seed(2)
                second = module(*args)
                if not _same(first, second):
                    return "its training-mode forward is stochastic (dropout or noise)"
                layer.train()
                ours = layer(*args)
                why = outputs_mismatch(ours, first)
                return None if why is None else f"training-mode forward differs: {why}"
        except Exception as exc:
            return f"training-mode forward could not be checked ({type(exc).__name__})"
        finally:
            for m, flag in flags:
                m.training = flag
            layer.training = module.training

    @staticmethod
    def _gradient_check(module: nn.Module, layer: nn.Module, args: tuple, train: bool) -> str | None:
        """None when the fused layer's backward gives the original's gradients (inputs and the
        parameters that require grad) in eval mode and, when ``train``, in train mode; else the
        reason every call that autograd records must run the original (a custom autograd
        Function, a detached router or routing weight: nothing the forward values show)."""
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()]
        try:
            for training in (False, True) if train else (False,):
                why = gradients_mismatch(module, layer, args, params, training)
                if why is not None:
                    return f"{'training' if training else 'eval'}-mode {why}"
        except Exception as exc:
            return f"gradients could not be checked ({type(exc).__name__}: {str(exc)[:120]})"
        finally:
            layer.training = module.training
        return None


def _weight_like(module: nn.Module, spec) -> torch.Tensor:
    """A tensor of the module whose dtype and device the probe input takes (read by path: the
    original module has no stacked storage of its own)."""
    return get_attr_path(module, spec.experts.down.paths()[0])


def optimize(model: nn.Module, config: KernelConfig | None = None, filter_fn: FilterFn | None = None,
             strict: bool = False, return_report: bool = False,
             calibration: Iterable | None = None,
             process_group: object = None) -> nn.Module | tuple[nn.Module, OptimizeReport]:
    """One-line form of :meth:`UnifiedManager.optimize`: ``model = kernel_moe.optimize(model)``
    returns the optimized model; ``model, report = kernel_moe.optimize(model, return_report=True)``
    also returns what was swapped and skipped, and why. ``process_group``: the group expert
    parallelism shards over (see :meth:`UnifiedManager.optimize`)."""
    manager = UnifiedManager(config)
    result = manager.optimize(model, filter_fn=filter_fn, strict=strict, calibration=calibration,
                              process_group=process_group)
    return (result, manager.report) if return_report else result


def restore(model: nn.Module) -> nn.Module:
    """Undo optimize(): the original modules are put back; returns the model (see
    :meth:`UnifiedManager.restore`)."""
    return UnifiedManager.restore(model)


__all__ = ["UnifiedManager", "optimize", "restore"]
