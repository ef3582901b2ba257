"""The report of ``python -m kernel_moe profile``: a markdown summary and a stacked-bar chart of
where the time of one MoE layer goes (matplotlib imported lazily: the ``plot`` extra).

The chart has one panel per (block, token count): a horizontal bar per variant, split into the
stages in forward order, in milliseconds per call, with each stage's share written on segments
wide enough to hold it, and a tick at the time measured without the profiler.
"""

from __future__ import annotations

import os
from pathlib import Path

from kernel_moe.bench.stages import STAGE_KEYS, STAGE_LABELS

STAGE_COLORS = {
    "router": "#8172b3",
    "gating": "#b39ddb",
    "dispatch": "#dd8452",
    "up": "#4c72b0",
    "down": "#64b5cd",
    "fused": "#2a9d8f",
    "combine": "#c44e52",
    "shared": "#937860",
    "other": "#c8c8c8",
}
MIN_LABELLED_SHARE = 0.07  # segments below this share of the bar carry no text


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _stages_present(results) -> list[str]:
    return [k for k in STAGE_KEYS if any(c.stages_s[k] > 0 for c in results.cases)]


def _stage_table(results, group: str, tokens: int, variants: list[str]) -> list[str]:
    cases = [results.case(group, v, tokens) for v in variants]
    cases = [c for c in cases if c is not None]
    header = "| stage | " + " | ".join(f"{c.variant} ms | share" for c in cases) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(cases)]
    for key in _stages_present(results):
        cells = [f"{_ms(c.stages_s[key])} | {c.share(key):.1%}" if c.stages_s[key] > 0 else "- | -" for c in cases]
        lines.append(f"| {STAGE_LABELS[key]} | " + " | ".join(cells) + " |")
    lines.append("| **total (profiled)** | " + " | ".join(f"**{_ms(c.profiled_s)}** | 100%" for c in cases) + " |")
    lines.append("| measured without profiler | "
                 + " | ".join(f"{_ms(c.measured_s)} | {c.gap:+.1%}" for c in cases) + " |")
    lines.append("| peak memory | " + " | ".join(f"{c.memory} | " if c.memory else "- | " for c in cases) + " |")
    return lines


def profile_markdown(results, command: str | None = None) -> str:
    """Environment, the command, one stage table per (block, token count), the check, notes."""
    meta = results.metadata
    parts = ["## Where the time of one MoE layer goes", ""]
    if command:
        parts += ["```", command, "```", ""]
    facts = [f"device: {meta.get('device_name', meta.get('device', '?'))}", f"dtype: {meta.get('dtype', '?')}",
             f"torch {meta.get('torch', '?')}", f"stage time: {meta.get('stage_time', '?')}",
             f"per case: {meta.get('steps', '?')} profiled calls in sessions of {meta.get('session', '?')}, "
             f"{meta.get('unprofiled', '?')} unprofiled calls per profiled one, alternating; the fastest half of "
             "each kind counts"]
    parts += [f"- {f}" for f in facts] + [""]
    parts += [
        "Each stage's time is its mean over the fastest half of the profiled calls; \"other\" is the rest of the "
        "call (Python, reshapes, op overhead), so the stages add up to the profiled total. That total is checked "
        "against the median of the fastest half of the same calls timed without the profiler (on a shared machine "
        "other processes now and then slow a call several-fold; the fastest half stands for the layer). Where the "
        "optimized layer runs the native fused CPU forward, gather, up-projection, activation, down-projection and "
        "combine are one call and one stage (`KERNEL_MOE_CPU_EXTENSION=off` runs the PyTorch path instead, whose "
        "stages are split).",
        "",
    ]
    variants = list(dict.fromkeys(c.variant for c in results.cases))
    for group in results.groups():
        info = meta.get("groups", {}).get(group, {})
        for tokens in results.tokens(group):
            parts += [f"### {group}, {tokens} tokens", ""]
            if info.get("block"):
                parts += [f"Block: `{info['block']}`.", ""]
            parts += _stage_table(results, group, tokens, variants) + [""]
            paths = [f"{c.variant}: {c.experts_path}" for c in results.cases if (c.group, c.tokens) == (group, tokens)]
            parts += ["Experts: " + "; ".join(paths) + ".", ""]
    verdict = "passed" if results.check_passed else "FAILED"
    parts += [f"### Check: stages add up to the unprofiled time within {results.tolerance:.0%} ({verdict})", ""]
    parts += [f"- {line}" for line in results.check_lines()] + [""]
    if results.notes:
        parts += ["### Notes", ""] + [f"- {n}" for n in results.notes] + [""]
    return "\n".join(parts)


def plot_stages(results, path: str | os.PathLike) -> str:
    """Stacked horizontal bars, original vs optimized, one panel per (block, token count)."""
    from kernel_moe.bench.plots import _figure

    panels = [(g, t) for g in results.groups() for t in results.tokens(g)]
    variants = list(dict.fromkeys(c.variant for c in results.cases))
    stages = _stages_present(results)
    fig = _figure(10.0, 1.0 + len(panels) * (0.55 * len(variants) + 0.9))
    grid = fig.add_gridspec(len(panels), 1)
    for i, (group, tokens) in enumerate(panels):
        ax = fig.add_subplot(grid[i, 0])
        cases = [results.case(group, v, tokens) for v in variants]
        for row, case in enumerate(cases):
            if case is None:
                continue
            left = 0.0
            for key in stages:
                width = case.stages_s[key] * 1e3
                if width <= 0:
                    continue
                ax.barh(row, width, left=left, color=STAGE_COLORS[key], edgecolor="white", linewidth=0.6)
                if case.share(key) >= MIN_LABELLED_SHARE:
                    ax.text(left + width / 2, row, f"{case.share(key):.0%}", ha="center", va="center", fontsize=8,
                            color="white" if key not in ("other", "gating") else "black")
                left += width
            ax.plot([case.measured_s * 1e3] * 2, [row - 0.42, row + 0.42], color="black", linewidth=1.6)
            ax.text(max(left, case.measured_s * 1e3), row, f"  {_ms(case.profiled_s)} ms\n  ({case.gap:+.1%} vs tick)",
                    va="center", fontsize=8)
        ax.set_yticks(range(len(variants)))
        ax.set_yticklabels(variants, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, max(max(c.profiled_s, c.measured_s) for c in cases if c is not None) * 1e3 * 1.22)
        ax.set_title(f"{group}, {tokens} tokens", fontsize=10, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        if i == len(panels) - 1:
            ax.set_xlabel("milliseconds per call (black tick: measured without the profiler)")
    handles = [_patch(STAGE_COLORS[k], STAGE_LABELS[k]) for k in stages]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8, frameon=False)
    meta = results.metadata
    fig.suptitle(f"Where the time of one MoE layer goes\n{meta.get('device_name', '')}, {meta.get('dtype', '')}",
                 fontsize=11)
    fig.savefig(Path(path))
    return os.fspath(path)


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, label=label)


__all__ = ["plot_stages", "profile_markdown"]
