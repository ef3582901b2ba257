"""Benchmark results: one record per (group, variant, batch, sequence) case, with
serialization (JSON round trip), a text summary, a markdown report and plots.

A *group* is one model shape measured side by side (e.g. "E8 I768 top2"); a *variant* is one
implementation of it ("original", "optimized", "dense_same_active", ...). Ratios are taken
against the group's "original" case of the same batch and sequence length.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import TextIO

from kernel_moe.bench.energy import NOT_AVAILABLE, EnergyReading
from kernel_moe.bench.memory import MemoryReading
from kernel_moe.bench.models import ParamCount
from kernel_moe.bench.stats import LatencySummary, LoadBalance

SCHEMA_VERSION = 1
REFERENCE_VARIANT = "original"


@dataclass
class LayerRouting:
    """Per-expert slot counts of one routed layer during one forward of a case."""

    layer: str
    counts: list[int]
    expected_total: int | None
    balance: LoadBalance

    @classmethod
    def from_counts(cls, layer: str, counts: list[int], expected_total: int | None) -> LayerRouting:
        return cls(layer, [int(c) for c in counts], expected_total, LoadBalance.from_counts(counts))

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "counts": self.counts,
            "expected_total": self.expected_total,
            "balance": self.balance.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerRouting:
        return cls(d["layer"], list(d["counts"]), d["expected_total"], LoadBalance(**d["balance"]))


@dataclass
class CaseResult:
    """Measurements of one variant at one input shape."""

    group: str
    variant: str
    batch_size: int
    seq_len: int
    tokens: int
    params: ParamCount
    latency: LatencySummary | None = None
    first_call_s: float | None = None
    memory: MemoryReading | None = None
    energy: EnergyReading | None = None
    routing: list[LayerRouting] = field(default_factory=list)
    flops_estimate: float | None = None
    bytes_estimate: float | None = None
    speedup_vs_original: float | None = None
    memory_vs_original: float | None = None
    energy_vs_original: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency is not None

    def _per_second(self, amount: float | None, unit: float) -> float | None:
        """``amount`` per call over the median latency, in ``unit``s per second (None when
        either is unknown)."""
        if amount is None or not self.ok or self.latency.median_s <= 0:
            return None
        return amount / self.latency.median_s / unit

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens per second at the median latency."""
        return self._per_second(self.tokens, 1.0)

    @property
    def energy_j_per_token(self) -> float | None:
        if self.energy is None or self.energy.joules_per_call is None:
            return None
        return self.energy.joules_per_call / self.tokens

    @property
    def achieved_tflops(self) -> float | None:
        return self._per_second(self.flops_estimate, 1e12)

    @property
    def achieved_gbps(self) -> float | None:
        return self._per_second(self.bytes_estimate, 1e9)

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "variant": self.variant,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "params": asdict(self.params),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "tokens_per_s": self.tokens_per_s,
            "first_call_s": self.first_call_s,
            "memory": None if self.memory is None else self.memory.to_dict(),
            "energy": None if self.energy is None else self.energy.to_dict(),
            "energy_j_per_token": self.energy_j_per_token,
            "routing": [r.to_dict() for r in self.routing],
            "flops_estimate": self.flops_estimate,
            "bytes_estimate": self.bytes_estimate,
            "achieved_tflops": self.achieved_tflops,
            "achieved_gbps": self.achieved_gbps,
            "speedup_vs_original": self.speedup_vs_original,
            "memory_vs_original": self.memory_vs_original,
            "energy_vs_original": self.energy_vs_original,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CaseResult:
        values = {f.name: d[f.name] for f in fields(cls)}
        values["params"] = ParamCount(**d["params"])
        for name, kind in (("latency", LatencySummary), ("memory", MemoryReading), ("energy", EnergyReading)):
            values[name] = None if d[name] is None else kind(**d[name])
        values["routing"] = [LayerRouting.from_dict(r) for r in d["routing"]]
        return cls(**values)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def fill_ratios(cases: list[CaseResult]) -> None:
    """Set the *_vs_original fields of every case from its group's "original" case.

    speedup = original latency / case latency (> 1 is faster); memory and energy ratios are
    case / original (< 1 is less).
    """
    ref = {(c.group, c.batch_size, c.seq_len): c for c in cases if c.variant == REFERENCE_VARIANT and c.ok}
    for c in cases:
        r = ref.get((c.group, c.batch_size, c.seq_len))
        if r is None or not c.ok:
            c.speedup_vs_original = c.memory_vs_original = c.energy_vs_original = None
            continue
        c.speedup_vs_original = _ratio(r.latency.median_s, c.latency.median_s)
        c.memory_vs_original = _ratio(
            None if c.memory is None else c.memory.peak_bytes, None if r.memory is None else r.memory.peak_bytes
        )
        c.energy_vs_original = _ratio(c.energy_j_per_token, r.energy_j_per_token)


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    rows = [[" ".join(cell.split()) for cell in r] for r in rows]  # one line per row
    if markdown:
        rows = [[cell.replace("|", "\\|") for cell in r] for r in rows]
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


CASE_HEADERS = [
    "group",
    "variant",
    "B x S",
    "tokens/s",
    "median ms (p10-p90)",
    "speedup",
    "peak MiB",
    "mem x",
    "energy mJ/tok",
    "active/total params",
    "routing max/mean / gini",
]


def _case_row(c: CaseResult) -> list[str]:
    shape = f"{c.batch_size} x {c.seq_len}"
    params = f"{c.params.active / 1e6:.2f}M/{c.params.total / 1e6:.2f}M"
    if not c.ok:
        return [c.group, c.variant, shape, "error", (c.error or "")[:60], "-", "-", "-", "-", params, "-"]
    lat = c.latency
    peak = None if c.memory is None or c.memory.peak_bytes is None else c.memory.peak_bytes / 2**20
    energy = c.energy_j_per_token
    worst = max(
        (r for r in c.routing if r.balance.max_over_mean is not None),
        key=lambda r: r.balance.max_over_mean,
        default=None,
    )
    return [
        c.group,
        c.variant,
        shape,
        _fmt(c.tokens_per_s, ",.0f"),
        f"{lat.median_s * 1e3:.3f} ({lat.p10_s * 1e3:.3f}-{lat.p90_s * 1e3:.3f})",
        _fmt(c.speedup_vs_original, ".2f") + ("x" if c.speedup_vs_original is not None else ""),
        _fmt(peak, ".1f"),
        _fmt(c.memory_vs_original, ".2f"),
        "-" if c.energy is None else NOT_AVAILABLE if energy is None else f"{energy * 1e3:.4f}",
        params,
        "-" if worst is None else f"{worst.balance.max_over_mean:.2f} / {worst.balance.gini:.2f}",
    ]


@dataclass
class BenchmarkResults:
    """All cases of a benchmark run, the environment they ran in, variants that could not run
    (with the reason) and derived tables (e.g. the break-even analysis)."""

    cases: list[CaseResult] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    derived: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: BenchmarkResults) -> None:
        """Append another run's cases, skips and derived rows (metadata of the first run is kept)."""
        self.cases.extend(other.cases)
        self.skipped.extend(other.skipped)
        for key, rows in other.derived.items():
            self.derived.setdefault(key, []).extend(rows)
        self.notes.extend(n for n in other.notes if n not in self.notes)
        for key, value in other.metadata.items():
            mine = self.metadata.setdefault(key, value)
            if mine is not value and isinstance(mine, dict) and isinstance(value, dict):
                mine.update(value)
        fill_ratios(self.cases)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.cases))

    def variants(self, group: str | None = None) -> list[str]:
        return list(dict.fromkeys(c.variant for c in self.cases if group is None or c.group == group))

    def select(self, group: str | None = None, variant: str | None = None) -> list[CaseResult]:
        return [
            c for c in self.cases if (group is None or c.group == group) and (variant is None or c.variant == variant)
        ]

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "metadata": self.metadata,
            "cases": [c.to_dict() for c in self.cases],
            "skipped": self.skipped,
            "derived": self.derived,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BenchmarkResults:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version={version!r}; allowed: {SCHEMA_VERSION}")
        return cls(
            cases=[CaseResult.from_dict(c) for c in d["cases"]],
            metadata=dict(d.get("metadata", {})),
            skipped=list(d.get("skipped", [])),
            derived={k: list(v) for k, v in d.get("derived", {}).items()},
            notes=list(d.get("notes", [])),
        )

    def to_json(self, path: str | os.PathLike) -> str:
        """Write the results as JSON; returns the path."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)
            f.write("\n")
        return os.fspath(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BenchmarkResults:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------ rendering
    def _case_table(self, markdown: bool) -> str:
        return _table(CASE_HEADERS, [_case_row(c) for c in self.cases], markdown)

    def _derived_tables(self, markdown: bool) -> list[str]:
        out = []
        for name, rows in self.derived.items():
            if not rows:
                continue
            headers = list(dict.fromkeys(k for r in rows for k in r))
            body = [[_derived_cell(r.get(h)) for h in headers] for r in rows]
            title = f"### {name}" if markdown else f"[{name}]"
            out.append(title + ("\n\n" if markdown else "\n") + _table(headers, body, markdown))
        return out

    def _header_lines(self) -> list[str]:
        m = self.metadata
        lines = [
            f"device: {m.get('device_name', '?')} ({m.get('device', '?')}), dtype {m.get('dtype', '?')}, "
            f"torch {m.get('torch', '?')}, timer {m.get('timer', '?')}"
        ]
        if m.get("preset"):
            described = f" ({m['preset_description']})" if m.get("preset_description") else ""
            lines.append(f"preset: {m['preset']}{described}")
        return lines

    def summary(self) -> str:
        """The text table :meth:`print_summary` prints."""
        parts = [*self._header_lines(), "", self._case_table(markdown=False)]
        parts += ["", *self._derived_tables(markdown=False)] if self.derived else []
        if self.skipped:
            parts += ["", "skipped:"] + [f"  {s['group']} / {s['variant']}: {s['reason']}" for s in self.skipped]
        if self.notes:
            parts += ["", *self.notes]
        return "\n".join(parts).rstrip() + "\n"

    def print_summary(self, file: TextIO | None = None) -> None:
        """Print the results table (speedup = original median / variant median)."""
        (file or sys.stdout).write(self.summary())

    def to_markdown(self) -> str:
        """A markdown report: environment, the case table, derived tables, skips and notes."""
        parts = ["## Benchmark results", "", *(f"- {line}" for line in self._header_lines()), ""]
        parts += [
            "Speedup = median latency of `original` / median latency of the variant (higher is faster); "
            "`mem x` = peak memory / original's; energy per token is `not available` where the machine "
            "has no energy counter and `-` where it was not measured.",
            "",
            self._case_table(markdown=True),
            "",
        ]
        for table in self._derived_tables(markdown=True):
            parts += [table, ""]
        if self.skipped:
            parts += ["### Skipped", ""] + [f"- `{s['group']}` / `{s['variant']}`: {s['reason']}" for s in self.skipped]
            parts.append("")
        if self.notes:
            parts += ["### Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(parts)

    def plot(self, directory: str | os.PathLike, **kwargs) -> list[str]:
        """Write the PNG charts that apply to these results; returns their paths.

        Needs matplotlib (the ``plot`` extra). Keyword arguments go to
        :func:`kernel_moe.bench.plots.plot_all` (e.g. ``peak_tflops``, ``peak_gbps``).
        """
        from kernel_moe.bench.plots import plot_all

        return plot_all(self, directory, **kwargs)


def _derived_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
