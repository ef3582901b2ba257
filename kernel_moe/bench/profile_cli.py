"""``python -m kernel_moe profile``: where the time of one MoE layer goes, original vs optimized
(profile.md, profile.json, profile.png), or ``--sweep``: top-k, capacity factor and number of
experts against throughput, expert load and dropped tokens (sweep.md, sweep.json, sweep.png).

Example::

    python -m kernel_moe profile --preset mixtral --tokens 64 256 --threads 1 --out out/profile
    python -m kernel_moe profile --sweep --tokens 512 --threads 1 --out out/sweep
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kernel_moe.bench.cli import DTYPES

logger = logging.getLogger("kernel_moe")

MIXTRAL_EIGHTH = dict(hidden_size=512, intermediate_size=1792, num_local_experts=8, num_experts_per_tok=2)


@dataclass(frozen=True)
class ProfilePreset:
    """MoE blocks to profile: ``build(seed)`` returns (name, block) pairs."""

    description: str
    default_tokens: tuple[int, ...]
    build: Callable[[int], list[tuple[str, nn.Module]]]


def _naive(shapes) -> Callable[[int], list[tuple[str, nn.Module]]]:
    from kernel_moe.bench.models import NaiveMoE

    def build(seed: int) -> list[tuple[str, nn.Module]]:
        blocks = []
        for shape in shapes:
            torch.manual_seed(seed)
            block = NaiveMoE(shape.hidden, shape.intermediate, shape.num_experts, shape.top_k)
            blocks.append((f"hand-written {shape.label}", block))
        return blocks

    return build


def _first_moe_block(model: nn.Module) -> nn.Module:
    """The first module of ``model`` named like a transformers sparse-MoE block."""
    for module in model.modules():
        if type(module).__name__.endswith("SparseMoeBlock"):
            return module
    raise ValueError(f"{type(model).__name__} has no *SparseMoeBlock module")


def _mixtral(seed: int) -> list[tuple[str, nn.Module]]:
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as exc:
        raise ValueError(f"preset 'mixtral' needs transformers: {exc}") from exc
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=256, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                           **MIXTRAL_EIGHTH)
    block = _first_moe_block(MixtralForCausalLM(config))
    return [("Mixtral block H512 E8 I1792 top2", block)]


def _hf(seed: int) -> list[tuple[str, nn.Module]]:
    from kernel_moe.bench.presets import tiny_hf_models

    try:
        models = tiny_hf_models(seed)
    except ImportError as exc:
        raise ValueError(f"preset 'hf' needs transformers: {exc}") from exc
    return [(f"{name} block", _first_moe_block(model)) for name, model in models]


def profile_presets() -> dict[str, ProfilePreset]:
    from kernel_moe.bench.presets import FAIR_SHAPE, THREE_WAY_SHAPES

    return {
        "mixtral": ProfilePreset("transformers MixtralSparseMoeBlock at 1/8 of Mixtral-8x7B's width: H512, "
                                 "8 experts of I1792, top-2", (64, 256), _mixtral),
        "fair": ProfilePreset("the fair preset's hand-written MoE: H384, 8 experts of I768, top-2", (64, 256),
                              _naive([FAIR_SHAPE])),
        "three_way": ProfilePreset("the three_way preset's three hand-written MoE shapes", (256,),
                                   _naive(THREE_WAY_SHAPES)),
        "hf": ProfilePreset("the first MoE block of the hf preset's tiny Mixtral and Qwen2-MoE (H128)", (512,), _hf),
    }


PRESET_NAMES = ("mixtral", "fair", "three_way", "hf")


def build_parser() -> argparse.ArgumentParser:
    presets = profile_presets()
    epilog = "presets:\n" + "\n".join(f"  {n:<10} {presets[n].description}" for n in PRESET_NAMES)
    parser = argparse.ArgumentParser(
        prog="python -m kernel_moe profile",
        description="Where the time of one MoE layer goes, stage by stage, original vs optimized, from the PyTorch "
                    "profiler; with --sweep: top-k, capacity factor and number of experts against throughput, "
                    "expert load and dropped tokens.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="mixtral", choices=PRESET_NAMES, help="which MoE blocks (default: mixtral)")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="N", help="tokens per call (several: one panel each)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the .md, .json and .png")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="run precision (default: float32)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (1 is steadiest on a CPU shared with other work)")
    parser.add_argument("--steps", type=int, default=20, help="profiled calls per variant and token count (default: 20)")
    parser.add_argument("--session", type=int, default=1, metavar="N",
                        help="profiled calls per profiler session (default: 1: the finest interleaving)")
    parser.add_argument("--unprofiled", type=int, default=2, metavar="N",
                        help="calls timed without the profiler per profiled call (default: 2)")
    parser.add_argument("--min-time", type=float, default=0.2, metavar="S",
                        help="--sweep: seconds of timed calls per point (default: 0.2)")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="largest gap allowed between the stages' sum and the unprofiled time (default: 0.10)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="write markdown and JSON only")
    parser.add_argument("--sweep", action="store_true", help="run the parameter sweeps instead (first --tokens value)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _settings(args: argparse.Namespace):
    from kernel_moe.bench.profile import ProfileSettings

    return ProfileSettings(steps=args.steps, session=args.session, unprofiled=args.unprofiled, threads=args.threads,
                           tolerance=args.tolerance, memory=not args.no_memory, seed=args.seed)


def _profile(args: argparse.Namespace, device: torch.device, command: str) -> tuple[list[str], bool]:
    from kernel_moe.bench.profile import ProfileResults, profile_layer

    preset = profile_presets()[args.preset]
    tokens = args.tokens or list(preset.default_tokens)
    settings = _settings(args)
    results = ProfileResults(tolerance=settings.tolerance)
    for name, block in preset.build(args.seed):
        results.extend(profile_layer(block, tokens, device=device, dtype=DTYPES[args.dtype], settings=settings,
                                     name=name))
    results.metadata.update(preset=args.preset, command=command, threads=args.threads)
    out: Path = args.out
    written = []
    if not args.no_plots:
        try:
            written.append(results.plot(out / "profile.png"))
        except ImportError as exc:
            logger.warning("profile: %s", exc)
            results.notes.append(str(exc))
    (out / "profile.md").write_text(results.to_markdown(command), encoding="utf-8")
    (out / "profile.json").write_text(json.dumps(results.to_dict(), indent=2), encoding="utf-8")
    written = [str(out / "profile.md"), str(out / "profile.json"), *written]
    _print_summary(results)
    return written, results.check_passed


def _print_summary(results) -> None:
    from kernel_moe.bench.stages import STAGE_KEYS, STAGE_LABELS

    out = sys.stdout
    for group in results.groups():
        for tokens in results.tokens(group):
            cases = [c for c in results.cases if (c.group, c.tokens) == (group, tokens)]
            out.write(f"\n{group}, {tokens} tokens (ms per call, share)\n")
            out.write(f"  {'stage':<42}" + "".join(f"{c.variant:>22}" for c in cases) + "\n")
            for key in STAGE_KEYS:
                if all(c.stages_s[key] == 0 for c in cases):
                    continue
                cells = "".join(f"{c.stages_s[key] * 1e3:>13.3f} {c.share(key):>7.1%}" for c in cases)
                out.write(f"  {STAGE_LABELS[key]:<42}{cells}\n")
            out.write(f"  {'total (profiled)':<42}" + "".join(f"{c.profiled_s * 1e3:>13.3f} {'':>7}" for c in cases)
                      + "\n")
            out.write(f"  {'peak memory':<42}" + "".join(f"{str(c.memory or '-'):>22}" for c in cases) + "\n")
    verdict = "passed" if results.check_passed else "FAILED"
    out.write(f"\ncheck: the stages add up to the time measured without the profiler within "
              f"{results.tolerance:.0%}: {verdict}\n")
    for line in results.check_lines():
        out.write(f"  {line}\n")


def _sweep(args: argparse.Namespace, device: torch.device, command: str) -> list[str]:
    from kernel_moe.bench.device import device_name
    from kernel_moe.bench.sweep import plot_sweep, run_sweep, sweep_markdown

    from kernel_moe.bench.settings import Timing

    tokens = (args.tokens or [512])[0]
    timing = Timing(warmup=3, min_time_s=args.min_time, min_samples=5, num_threads=args.threads)
    points = run_sweep(tokens, device, DTYPES[args.dtype], timing)
    facts = [f"device: {device_name(device).split(' (')[0]}", f"torch threads: {args.threads or torch.get_num_threads()}",
             f"dtype: {args.dtype}", f"tokens per call: {tokens}"]
    out: Path = args.out
    text = sweep_markdown(points, command, facts)
    (out / "sweep.md").write_text(text, encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps([p.to_dict() for p in points], indent=2), encoding="utf-8")
    written = [str(out / "sweep.md"), str(out / "sweep.json")]
    if not args.no_plots:
        try:
            written.append(plot_sweep(points, out / "sweep.png"))
        except ImportError as exc:
            logger.warning("profile --sweep: %s", exc)
    sys.stdout.write(text)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``profile`` command; ``argv`` may start with the word "profile". Returns the exit
    code: 0, 1 when the check failed, 2 for bad arguments."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "profile":
        args_list = args_list[1:]
    args = build_parser().parse_args(args_list)
    from kernel_moe.bench.device import resolve_device

    command = "python -m kernel_moe profile " + shlex.join(args_list)
    try:
        device = resolve_device(args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.sweep:
            written, passed = _sweep(args, device, command), True
        else:
            written, passed = _profile(args, device, command)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write("wrote: " + ", ".join(written) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
