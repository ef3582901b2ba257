"""``python -m kernel_moe bench``: run a preset, write JSON, markdown and plots, print a summary.

Example::

    python -m kernel_moe bench --preset fair --tokens 256 1024 --out out/fair
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kernel_moe.bench.settings import BenchSettings

logger = logging.getLogger("kernel_moe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    from kernel_moe.bench.presets import PRESETS

    epilog = "presets:\n" + "\n".join(f"  {p.name:<11} {p.description}" for p in PRESETS.values())
    parser = argparse.ArgumentParser(
        prog="python -m kernel_moe bench",
        description="Benchmark MoE implementations side by side and write JSON, markdown and PNG plots.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="which sweep to run")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="N", help="tokens per forward call (several: a sweep)")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder for results.json, results.md and *.png"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="run precision (default: float32)")
    parser.add_argument("--min-time", type=float, default=0.2, metavar="S", help="seconds of samples per case")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per case after the first")
    parser.add_argument("--compile", action="store_true", help="add optimized+compiled to the module presets")
    parser.add_argument("--no-energy", action="store_true", help="skip the >= 1 s energy windows")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--measure-peaks", action="store_true", help="time a matmul and a copy for the roofline")
    parser.add_argument("--peak-tflops", type=float, default=None, help="compute ceiling for the roofline")
    parser.add_argument("--peak-gbps", type=float, default=None, help="bandwidth ceiling for the roofline")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="torch CPU threads during the run (1 is steadiest on a CPU shared with other work)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The :class:`~kernel_moe.bench.settings.BenchSettings` of every benchmark of the run."""
    from kernel_moe.bench.settings import BenchSettings, Inputs, Measurements, Timing

    return BenchSettings(
        timing=Timing(warmup=args.warmup, min_time_s=args.min_time, num_threads=args.threads),
        measurements=Measurements(energy=not args.no_energy),
        inputs=Inputs(seed=args.seed),
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bench`` command; ``argv`` may start with the word "bench". Returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "bench":
        args_list = args_list[1:]
    args = build_parser().parse_args(args_list)

    from kernel_moe.bench.device import measure_device_peaks, resolve_device
    from kernel_moe.bench.presets import run_preset

    try:
        device = resolve_device(args.device)
        results = run_preset(
            args.preset,
            args.tokens,
            device=device,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            compile=args.compile,
            settings=settings_from_args(args),
        )
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.measure_peaks:
        previous = torch.get_num_threads()
        torch.set_num_threads(args.threads or previous)  # the same threads as the cases
        try:
            results.metadata["device_peaks"] = measure_device_peaks(device).to_dict()
        finally:
            torch.set_num_threads(previous)
    if args.peak_tflops and args.peak_gbps:
        results.metadata["device_peaks"] = {
            "matmul_tflops": args.peak_tflops,
            "copy_gbps": args.peak_gbps,
            "source": "given",
        }
    _flag_impossible(results)

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if not args.no_plots:
        try:
            written += results.plot(args.out)
        except ImportError as exc:
            logger.warning("bench: %s", exc)
            results.notes.append(str(exc))
    written.insert(0, results.to_json(args.out / "results.json"))
    (args.out / "results.md").write_text(results.to_markdown(), encoding="utf-8")
    written.insert(1, str(args.out / "results.md"))
    results.print_summary()
    sys.stdout.write("wrote: " + ", ".join(written) + "\n")
    return 0


def _flag_impossible(results) -> None:
    """Note every case whose estimated TFLOP/s (or, on a GPU, GB/s) exceeds the device ceilings."""
    peaks = results.metadata.get("device_peaks")
    if not peaks:
        return
    for c in results.cases:
        over = []
        if c.achieved_tflops is not None and c.achieved_tflops > peaks["matmul_tflops"]:
            over.append(f"{c.achieved_tflops:.3g} TFLOP/s > {peaks['matmul_tflops']:.3g}")
        # on a CPU the weights of small cases sit in cache, so only the compute ceiling is a hard bound
        on_gpu = str(results.metadata.get("device", "")).startswith("cuda")
        if on_gpu and c.achieved_gbps is not None and c.achieved_gbps > peaks["copy_gbps"]:
            over.append(f"{c.achieved_gbps:.3g} GB/s > {peaks['copy_gbps']:.3g}")
        if over:
            results.notes.append(
                f"{c.group} / {c.variant} {c.batch_size}x{c.seq_len}: above the device ceiling ({'; '.join(over)}): "
                "the estimate or the timing is wrong, do not use this figure"
            )


if __name__ == "__main__":
    raise SystemExit(main())
