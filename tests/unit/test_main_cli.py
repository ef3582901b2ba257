"""``python -m kernel_moe env | build``: the native CPU kernels' state is reported, and build
fails (exit 1) when they cannot be built."""

from __future__ import annotations

from helpers import no_compiler, simulate_cpu_extension_build
from kernel_moe.__main__ import main
from kernel_moe.kernels import cpu as cpu_kernels


def test_env_reports_the_native_cpu_kernels(capsys, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert main(["env"]) == 0
    assert "native CPU kernels: off" in capsys.readouterr().out


def test_build_exit_status_follows_the_build(capsys, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    simulate_cpu_extension_build(monkeypatch, no_compiler)
    assert main(["build"]) == 1
    assert "unavailable: OSError: no C++ compiler found" in capsys.readouterr().out
    simulate_cpu_extension_build(monkeypatch, lambda: cpu_kernels)  # any module stands for a build
    assert main(["build"]) == 0
    assert "native CPU kernels: loaded" in capsys.readouterr().out
