"""The slot cache of one offloaded layer: which experts sit in its fast slots, which to evict,
and the waves a step runs in; plus the counters an offloaded layer reports.

Pure bookkeeping (Python ints, no tensors), so the policy can be replayed on recorded routing
traces (``benchmarks/bench_offload.py``) exactly as the layer runs it.

Eviction policies (``KernelConfig.offload_eviction``):

- ``"lru"``: evict the slot whose expert was used least recently.
- ``"frequency"``: frequency with age: each expert keeps a use count that decays by
  ``FREQUENCY_DECAY`` per step of its layer (``score = count * decay ** (now - last_use)``, one
  more on each use, remembered for evicted experts too); evict the lowest score, the older on a
  tie. A popular expert survives a burst of one-off experts that would flush an LRU cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from kernel_moe.config import OFFLOAD_EVICTIONS as EVICTION_POLICIES
FREQUENCY_DECAY = 0.99  # per step of the layer (a half-life of 69 steps); chosen on routing traces (docs/performance.md)

Wave = list[tuple[int, int, bool]]
"""(expert id, slot, whether it must be copied in before the wave runs) for each expert of a wave."""


class SlotCache:
    """Expert -> slot map of ``num_slots`` slots over ``num_experts`` experts with an eviction policy."""

    def __init__(self, num_experts: int, num_slots: int, policy: str = "frequency",
                 decay: float = FREQUENCY_DECAY) -> None:
        if policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy {policy!r} is not known; allowed: {', '.join(EVICTION_POLICIES)}")
        if not 1 <= num_slots <= num_experts:
            raise ValueError(f"num_slots={num_slots} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.num_slots, self.policy, self.decay = num_experts, num_slots, policy, decay
        self.clock = 0
        self.clear()

    def clear(self) -> None:
        """Forget what the slots hold (their contents are stale) but keep the use history."""
        self.slot_of: dict[int, int] = {}
        self.expert_in: list[int | None] = [None] * self.num_slots
        if not hasattr(self, "last_use"):
            self.last_use = [-1] * self.num_experts
            self.count = [0.0] * self.num_experts

    def resident(self, expert: int) -> bool:
        return expert in self.slot_of

    def score(self, expert: int) -> float:
        """The decayed use count of ``expert`` now."""
        last = self.last_use[expert]
        return 0.0 if last < 0 else self.count[expert] * self.decay ** (self.clock - last)

    def _use(self, experts: list[int]) -> None:
        """One step of the layer used ``experts``."""
        self.clock += 1
        for e in experts:
            self.count[e] = self.score(e) + 1.0
            self.last_use[e] = self.clock

    def victim(self, keep: set[int]) -> int | None:
        """The slot to fill next: a free one, else the policy's choice among slots whose expert is
        not in ``keep``; None when every slot holds an expert of ``keep``."""
        best, best_key = None, None
        for slot, e in enumerate(self.expert_in):
            if e is None:
                return slot
            if e in keep:
                continue
            key = (self.last_use[e],) if self.policy == "lru" else (self.score(e), self.last_use[e])
            if best_key is None or key < best_key:
                best, best_key = slot, key
        return best

    def assign(self, expert: int, slot: int) -> int | None:
        """Put ``expert`` in ``slot``; returns the expert evicted from it (None: it was free)."""
        old = self.expert_in[slot]
        if old is not None:
            del self.slot_of[old]
        self.expert_in[slot] = expert
        self.slot_of[expert] = slot
        return old

    def undo(self, expert: int, slot: int, evicted: int | None) -> None:
        """A copy of ``expert`` into ``slot`` was not made: the slot still holds ``evicted`` (or is free)."""
        if self.expert_in[slot] == expert:
            del self.slot_of[expert]
            self.expert_in[slot] = None
            if evicted is not None:
                self.assign(evicted, slot)

    def plan(self, needed: list[int]) -> list[Wave]:
        """The waves that run the distinct experts ``needed`` by one step: one wave when they fit
        in the slots, else the resident ones and as many misses as fit first, then the rest of the
        misses a slot-full at a time (each wave evicting the previous one's experts). Records the
        use and assigns the slots: the caller copies in every entry marked to load."""
        self._use(needed)
        pending = [e for e in needed if e not in self.slot_of]
        wave: Wave = [(e, self.slot_of[e], False) for e in needed if e in self.slot_of]
        waves: list[Wave] = []
        while True:
            members = {e for e, _, _ in wave}
            while pending and len(wave) < self.num_slots:
                e = pending.pop(0)
                slot = self.victim(members)
                self.assign(e, slot)
                wave.append((e, slot, True))
                members.add(e)
            waves.append(wave)
            if not pending:
                return waves
            wave = []

    def prefetch_plan(self, predicted: list[int], cap: int,
                      protect: set[int] = frozenset()) -> list[tuple[int, int, int | None]]:
        """(expert, slot, expert evicted or None) copies that bring up to ``cap`` of the ``predicted``
        experts in ahead of need, never evicting a predicted expert or one of ``protect``. Assigns
        the slots (:meth:`undo` puts a copy not made back)."""
        keep = set(predicted) | set(protect)
        loads = []
        for e in predicted:
            if len(loads) >= cap:
                break
            if e in self.slot_of:
                continue
            slot = self.victim(keep)
            if slot is None:
                break
            loads.append((e, slot, self.assign(e, slot)))
        return loads


@dataclass
class OffloadStats:
    """What an offloaded layer (or a sum of them) did since it was built or last reset.

    - ``steps`` / ``tokens``: forward calls and tokens through them.
    - ``needed`` / ``hits``: distinct experts the steps routed to, and how many of them already
      sat in a slot (a prefetched one counts as a hit); ``loads``: copies a step waited for.
    - ``extra_waves``: waves beyond the first (a step routed to more experts than slots).
    - ``predicted`` / ``predicted_used``: experts the previous layer's prefetch predicted for a
      step, and how many of them the step used; ``prefetched`` / ``prefetch_used``: the predicted
      experts that were copied in ahead of need, and how many of those the step used.
    - ``bytes_moved``: bytes copied from the slow tier into slots (demand and prefetch).
    """

    steps: int = 0
    tokens: int = 0
    needed: int = 0
    hits: int = 0
    loads: int = 0
    extra_waves: int = 0
    predicted: int = 0
    predicted_used: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    bytes_moved: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 0.0

    @property
    def prediction_accuracy(self) -> float:
        """Share of predicted experts the step used."""
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched copies the step used."""
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0

    def __add__(self, other: OffloadStats) -> OffloadStats:
        return OffloadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "prediction_accuracy": self.prediction_accuracy,
                "prefetch_accuracy": self.prefetch_accuracy, "bytes_per_token": self.bytes_per_token}

    def __str__(self) -> str:
        return (f"hit rate {self.hit_rate:.1%} over {self.needed} expert uses, {self.loads} loads, "
                f"{self.extra_waves} extra waves, prefetch accuracy {self.prefetch_accuracy:.1%} "
                f"({self.prefetched} prefetched), {self.bytes_per_token / 2**20:.2f} MiB moved per token")


__all__ = ["EVICTION_POLICIES", "FREQUENCY_DECAY", "OffloadStats", "SlotCache", "Wave"]
