"""PNG charts of benchmark results (matplotlib, imported lazily: the ``plot`` extra).

Charts drawn when the results hold what they need:

- ``throughput.png``: tokens/s vs tokens per call, one line per variant, one panel per group
  (groups measured at two or more token counts).
- ``speedup.png``: speedup over the original per variant, one bar group per case.
- ``utilization.png``: routed share per (layer, expert) relative to a uniform split.
- ``break_even.png``: MoE time / dense-same-total time vs expert count, measured and by the
  simple model, with the break-even line at 1.
- ``roofline.png``: achieved TFLOP/s vs arithmetic intensity under the given (or measured)
  compute and bandwidth ceilings.

Figures use matplotlib's object API (no pyplot), so the caller's backend is left alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MISSING_MATPLOTLIB = "plotting needs matplotlib; install the plot extra: pip install 'kernel_moe[plot]'"
MAX_HEATMAP_GROUPS = 8


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(MISSING_MATPLOTLIB) from exc
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(count: int, width: float, height: float, title_height: float):
    """A figure of ``count`` panels of ``width`` x ``height`` inches, at most three a row, with
    ``title_height`` inches for the title; returns it and the panels' axes in order."""
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = _figure(width * cols, height * rows + title_height)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def _save(fig, path: Path) -> str:
    fig.savefig(path)
    return os.fspath(path)


def _compact(value: float, _pos=None) -> str:
    """Tick label without scientific notation: 0.5, 20, 1.5k, 2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _log_axis(ax, which: str, base: int = 10, ticks: list[float] | None = None, values=None) -> str:
    """Log scale with plain labels at 1-2-5 steps, or at the integer ``ticks``; no minor labels.

    When ``values`` span less than a factor of 4 a linear scale is clearer and is used instead.
    Returns the scale used.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    finite = [v for v in (values or []) if v is not None and v > 0 and math.isfinite(v)]
    if finite and max(finite) / min(finite) < 4:
        axis.set_major_formatter(FuncFormatter(_compact))
        return "linear"
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    axis.set_major_locator(FixedLocator(ticks) if ticks else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.0f}") if ticks else FuncFormatter(_compact))
    axis.set_minor_formatter(NullFormatter())
    return "log"


def _variant_colors(variants: list[str]) -> dict[str, str]:
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974"]
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


def _title(results, text: str) -> str:
    device = results.metadata.get("device_name")
    dtype = results.metadata.get("dtype")
    suffix = ", ".join(x for x in (device, dtype) if x)
    return f"{text}\n{suffix}" if suffix else text


def plot_throughput(results, path: Path) -> str | None:
    groups = [g for g in results.groups() if len({c.tokens for c in results.select(group=g) if c.ok}) >= 2]
    if not groups:
        return None
    colors = _variant_colors(results.variants())
    fig, axes = _panels(len(groups), 5.0, 3.8, 0.6)
    for ax, group in zip(axes, groups, strict=True):
        for variant in results.variants(group):
            pts = sorted((c.tokens, c.tokens_per_s) for c in results.select(group, variant) if c.ok)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant, color=colors[variant])
        _log_axis(ax, "x", base=2, ticks=sorted({c.tokens for c in results.select(group=group) if c.ok}))
        _log_axis(ax, "y", values=[c.tokens_per_s for c in results.select(group=group) if c.ok])
        ax.set_xlabel("tokens per call (B x S)")
        ax.set_ylabel("throughput (tokens/s)")
        ax.set_title(group, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(results, "Throughput vs tokens per call (higher is better)"), fontsize=11)
    return _save(fig, path)


def plot_speedup(results, path: Path) -> str | None:
    """Grouped bars, vertical for a few cases and horizontal (one row per case) for many."""
    cases = [c for c in results.cases if c.ok and c.speedup_vs_original is not None]
    others = [v for v in results.variants() if v != "original" and any(c.variant == v for c in cases)]
    if not others:
        return None
    keys = list(dict.fromkeys((c.group, c.batch_size, c.seq_len) for c in cases))
    by_key = {(c.group, c.batch_size, c.seq_len, c.variant): c.speedup_vs_original for c in cases}
    colors = _variant_colors(results.variants())
    width = 0.8 / len(others)
    horizontal = len(keys) > 6
    labels = [f"{g}, {b}x{s}" if horizontal else f"{g}\n{b}x{s}" for g, b, s in keys]
    if horizontal:
        fig = _figure(9.0, min(40.0, 0.22 * len(keys) * len(others) + 2.0))
    else:
        fig = _figure(max(6.0, 0.9 * len(keys) * len(others) + 2.5), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for j, variant in enumerate(others):
        pos = [i + (j - (len(others) - 1) / 2) * width for i in range(len(keys))]
        vals = [by_key.get((*k, variant), float("nan")) for k in keys]
        if horizontal:
            bars = ax.barh(pos, vals, height=width, label=variant, color=colors[variant])
        else:
            bars = ax.bar(pos, vals, width=width, label=variant, color=colors[variant])
        ax.bar_label(bars, labels=[_fmt_ratio(v) for v in vals], fontsize=7, padding=2)
    if horizontal:
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="original (1x)")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        scale = _log_axis(ax, "x", values=[*by_key.values(), 1.0])
        ax.set_xlabel(f"speedup over original (x, {scale} scale)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    else:
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="original (1x)")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=8)
        scale = _log_axis(ax, "y", values=[*by_key.values(), 1.0])
        ax.set_ylabel(f"speedup over original (x, {scale} scale)")
        ax.set_xlabel("group, batch x sequence")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(results, "Speedup over the original (median latency ratio; higher is faster)"), fontsize=11)
    return _save(fig, path)


def _fmt_ratio(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}x"


def _routing_case(results, group: str):
    """The case whose routing represents a group: the most tokens, preferring 'optimized'."""
    with_routing = [c for c in results.select(group=group) if c.ok and c.routing]
    if not with_routing:
        return None
    rank = {"optimized": 0, "original": 1}
    return min(with_routing, key=lambda c: (-c.tokens, rank.get(c.variant, 2)))


def plot_utilization(results, path: Path) -> str | None:
    picks = [(g, _routing_case(results, g)) for g in results.groups()]
    picks = [(g, c) for g, c in picks if c is not None]
    if not picks:
        return None
    shown = "" if len(picks) <= MAX_HEATMAP_GROUPS else f", first {MAX_HEATMAP_GROUPS} of {len(picks)} groups"
    picks = picks[:MAX_HEATMAP_GROUPS]
    heights = [max(1, len(c.routing)) for _, c in picks]
    fig = _figure(9.0, sum(0.45 * h + 1.1 for h in heights) + 0.8)
    grid = fig.add_gridspec(len(picks), 1, height_ratios=[0.45 * h + 1.1 for h in heights])
    image = None
    for i, (group, case) in enumerate(picks):
        ax = fig.add_subplot(grid[i, 0])
        rows = []
        for layer in case.routing:
            mean = sum(layer.counts) / len(layer.counts)
            rows.append([cnt / mean if mean else 0.0 for cnt in layer.counts])
        image = ax.imshow(rows, aspect="auto", cmap="RdBu_r", vmin=0.0, vmax=2.0, interpolation="nearest")
        num_experts = len(rows[0])
        if num_experts <= 16:
            for r, row in enumerate(rows):
                for e, value in enumerate(row):
                    ax.text(e, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([layer.layer for layer in case.routing], fontsize=7)
        step = max(1, num_experts // 16)
        ax.set_xticks(range(0, num_experts, step))
        ax.set_xlabel("expert index")
        ax.set_ylabel("layer")
        ax.set_title(f"{group} ({case.variant}, {case.tokens} tokens, top-{_top_k(case)})", fontsize=9)
    cbar = fig.colorbar(image, ax=fig.axes, shrink=0.9)
    cbar.set_label("load / uniform load\n(1 = balanced)")
    fig.suptitle(_title(results, f"Expert utilization (slots routed to each expert{shown})"), fontsize=11)
    return _save(fig, path)


def _top_k(case) -> str:
    layer = case.routing[0]
    if layer.expected_total:
        return str(layer.expected_total // case.tokens)
    return "?"


def plot_break_even(results, path: Path) -> str | None:
    rows = results.derived.get("break_even") or []
    if not rows:
        return None
    token_counts = sorted({r["tokens"] for r in rows})
    variants = sorted({r["moe_variant"] for r in rows})
    shapes = sorted({(r["I"], r["k"]) for r in rows})
    colors = _variant_colors([f"I{i} top{k}" for i, k in shapes])
    markers = dict(zip(variants, ["o", "s", "^", "D", "v"], strict=False))
    fig, axes = _panels(len(token_counts), 7.5, 5.0, 0.5)
    for ax, tokens in zip(axes, token_counts, strict=True):
        for inter, k in shapes:
            color = colors[f"I{inter} top{k}"]
            for variant in variants:
                pts = sorted(
                    (r for r in rows if (r["I"], r["k"], r["moe_variant"], r["tokens"]) == (inter, k, variant, tokens)),
                    key=lambda r: r["E"],
                )
                if not pts:
                    continue
                es = [p["E"] for p in pts]
                ax.plot(es, [p["measured_ratio"] for p in pts], marker=markers[variant], color=color,
                        label=f"I={inter}, top-{k}, {variant}")
                ax.plot(es, [p["model_ratio"] for p in pts], linestyle=":", marker="x", color=color, alpha=0.8)
        ax.axhline(1.0, color="black", linewidth=1.2, linestyle="--", label="break-even (MoE = dense same total)")
        ax.plot([], [], linestyle=":", marker="x", color="gray", label="model: k/E x (1 + overhead)")
        _log_axis(ax, "x", base=2, ticks=sorted({r["E"] for r in rows}))
        _log_axis(ax, "y", values=[v for r in rows for v in (r["measured_ratio"], r["model_ratio"])] + [1.0])
        ax.set_xlabel("number of experts E")
        ax.set_ylabel("MoE time / dense-same-total time (< 1: MoE wins)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{tokens} tokens per call", fontsize=10)
    fig.suptitle(_title(results, "Break-even: MoE vs dense FFN with the same total parameters"), fontsize=11)
    return _save(fig, path)


def plot_roofline(results, path: Path, peak_tflops: float, peak_gbps: float) -> str | None:
    cases = [c for c in results.cases if c.ok and c.achieved_tflops is not None and c.bytes_estimate]
    if not cases:
        return None
    colors = _variant_colors(results.variants())
    intensities = [c.flops_estimate / c.bytes_estimate for c in cases]
    lo = min(min(intensities), peak_tflops * 1e3 / peak_gbps) / 4
    hi = max(max(intensities), peak_tflops * 1e3 / peak_gbps) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig = _figure(8.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    roof = [min(peak_tflops, x * peak_gbps / 1e3) for x in xs]
    ax.plot(xs, roof, color="black", linewidth=1.5, label=f"roof: {peak_tflops:.3g} TFLOP/s, {peak_gbps:.3g} GB/s")
    seen = set()
    for c, ai in zip(cases, intensities, strict=True):
        label = c.variant if c.variant not in seen else None
        seen.add(c.variant)
        ax.scatter([ai], [c.achieved_tflops], color=colors[c.variant], label=label, s=28, zorder=3)
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, estimated)")
    ax.set_ylabel("achieved TFLOP/s (2 x active params x tokens / median time)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(results, "Roofline position of each case"), fontsize=11)
    return _save(fig, path)


def plot_all(
    results, directory: str | os.PathLike, peak_tflops: float | None = None, peak_gbps: float | None = None
) -> list[str]:
    """Write every chart that applies to ``results`` into ``directory``; returns the PNG paths.

    The roofline is drawn when both ceilings are given (or stored in
    ``results.metadata["device_peaks"]`` by ``--measure-peaks``).
    """
    _figure(1, 1)  # fail early with the install hint when matplotlib is missing
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_throughput(results, out / "throughput.png"),
        plot_speedup(results, out / "speedup.png"),
        plot_utilization(results, out / "utilization.png"),
        plot_break_even(results, out / "break_even.png"),
    ]
    peaks = results.metadata.get("device_peaks") or {}
    peak_tflops = peak_tflops or peaks.get("matmul_tflops")
    peak_gbps = peak_gbps or peaks.get("copy_gbps")
    if peak_tflops and peak_gbps:
        paths.append(plot_roofline(results, out / "roofline.png", peak_tflops, peak_gbps))
    return [p for p in paths if p is not None]
