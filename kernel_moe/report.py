"""OptimizeReport: what optimize() swapped, what it skipped and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class SwapRecord:
    name: str
    original_class: str
    new_class: str
    num_experts: int
    top_k: int
    parameters: int
    details: str = ""


@dataclass(frozen=True)
class SkipRecord:
    name: str
    module_class: str
    reason: str


@dataclass
class OptimizeReport:
    """The outcome of one ``optimize()`` call. ``str(report)`` is a table."""

    swapped: list[SwapRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    already_optimized: list[str] = field(default_factory=list)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def to_dict(self) -> dict:
        return {
            "swapped": [asdict(r) for r in self.swapped],
            "skipped": [asdict(r) for r in self.skipped],
            "already_optimized": list(self.already_optimized),
        }

    def summary(self) -> str:
        return (
            f"kernel_moe: swapped {len(self.swapped)} module(s), skipped {len(self.skipped)}, "
            f"already optimized {len(self.already_optimized)}"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.swapped:
            rows = [("module", "original", "new", "experts", "top_k", "params", "details")]
            rows += [(r.name, r.original_class, r.new_class, str(r.num_experts), str(r.top_k) if r.top_k else "-",
                      f"{r.parameters:,}", r.details) for r in self.swapped]
            lines += ["", "swapped:"] + _table(rows)
        if self.skipped:
            rows = [("module", "class", "reason")] + [(r.name, r.module_class, r.reason) for r in self.skipped]
            lines += ["", "skipped:"] + _table(rows)
        if self.already_optimized:
            lines += ["", "already optimized: " + ", ".join(self.already_optimized)]
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(rows[0]), "  " + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
