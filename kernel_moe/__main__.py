"""Command line: ``python -m kernel_moe demo | bench | profile | env | build``."""

from __future__ import annotations

import argparse
import platform
import sys


def _env() -> None:
    import torch

    from kernel_moe.kernels import triton_available

    print(f"python {platform.python_version()}, torch {torch.__version__}, triton installed: {triton_available()}")
    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    from kernel_moe.kernels.cpu import extension_status

    print(f"native CPU kernels: {extension_status()}")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers not installed (extra 'hf')")


def _build() -> int:
    """Compile (or load from torch's cache) the native CPU kernels now rather than on first use."""
    from kernel_moe.kernels.cpu import extension_status

    status = extension_status()
    print(f"native CPU kernels: {status}")
    return 0 if status.startswith(("loaded", "off")) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from kernel_moe.bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["profile"]:
        from kernel_moe.bench.profile_cli import main as profile_main

        return profile_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kernel_moe", description=__doc__)
    parser.add_argument("command", choices=["demo", "bench", "profile", "env", "build"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from kernel_moe.demo import run_demo

        run_demo()
    elif args.command == "build":
        return _build()
    else:
        _env()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
