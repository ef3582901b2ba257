"""The slot cache of offloaded layers: eviction by LRU and by frequency with age, waves when a step
routes to more experts than slots, prefetch plans that respect the cap and protected experts, stats."""

from __future__ import annotations

import pytest

from kernel_moe.layers.slot_cache import OffloadStats, SlotCache


def _fill(cache: SlotCache, steps: list[list[int]]) -> None:
    for needed in steps:
        for e, slot, load in (entry for wave in cache.plan(needed) for entry in wave):
            assert cache.slot_of[e] == slot


def test_lru_evicts_the_least_recently_used_and_frequency_keeps_the_popular():
    steps = [[0], [0], [0], [0], [1], [2]]  # expert 0 popular, then 1 and 2 once each
    lru, freq = SlotCache(8, 2, "lru"), SlotCache(8, 2, "frequency")
    _fill(lru, steps)
    _fill(freq, steps)
    assert set(lru.slot_of) == {1, 2}  # LRU flushed the popular expert
    assert set(freq.slot_of) == {0, 2}  # frequency kept it and evicted the one-off expert 1


def test_one_wave_when_the_experts_fit_and_waves_that_cover_every_expert_once_when_not():
    cache = SlotCache(10, 3, "lru")
    waves = cache.plan([0, 1, 2])
    assert len(waves) == 1 and all(load for _, _, load in waves[0])
    waves = cache.plan([1, 3, 4, 5, 6, 7, 8])
    assert [len(w) for w in waves] == [3, 3, 1]
    assert waves[0][0] == (1, waves[0][0][1], False)  # the resident expert runs first, without a copy
    experts = [e for w in waves for e, _, _ in w]
    assert sorted(experts) == [1, 3, 4, 5, 6, 7, 8]
    for wave in waves:
        slots = [s for _, s, _ in wave]
        assert len(set(slots)) == len(slots)  # no slot holds two experts of one wave
    last = {e: s for e, s, _ in waves[-1]}
    assert all(cache.slot_of[e] == s for e, s in last.items())


def test_one_slot_runs_one_expert_per_wave():
    cache = SlotCache(4, 1, "frequency")
    waves = cache.plan([0, 1, 2, 3])
    assert [[e for e, _, _ in w] for w in waves] == [[0], [1], [2], [3]]


def test_prefetch_respects_the_cap_and_never_evicts_protected_or_predicted_experts():
    cache = SlotCache(8, 3, "lru")
    cache.plan([0, 1, 2])
    loads = cache.prefetch_plan([5, 6, 7], cap=2, protect={0})
    assert len(loads) == 2 and {e for e, _, _ in loads} == {5, 6}
    assert cache.resident(0) and cache.resident(5) and cache.resident(6)
    assert {old for _, _, old in loads} == {1, 2}
    assert cache.prefetch_plan([0, 5, 6, 7], cap=3) == []  # every slot holds a predicted expert
    assert cache.prefetch_plan([5], cap=1) == []  # already resident
    e, slot, old = loads[1]
    cache.undo(e, slot, old)  # that copy was not made: the slot holds the expert it held before
    assert not cache.resident(e) and cache.slot_of[old] == slot


def test_invalid_arguments_name_what_is_allowed():
    with pytest.raises(ValueError, match="eviction policy 'fifo'.*frequency, lru"):
        SlotCache(4, 2, "fifo")
    with pytest.raises(ValueError, match="num_slots=5 must be in \\[1, num_experts=4\\]"):
        SlotCache(4, 5)


def test_stats_rates_and_sums():
    a = OffloadStats(steps=2, tokens=4, needed=10, hits=6, loads=4, prefetched=2, prefetch_used=1, bytes_moved=600,
                     predicted=4, predicted_used=3)
    total = a + OffloadStats(tokens=2, needed=10, hits=4)
    assert (a.hit_rate, a.prefetch_accuracy, a.prediction_accuracy, a.bytes_per_token) == (0.6, 0.5, 0.75, 150.0)
    assert total.hit_rate == 0.5 and total.tokens == 6
    assert OffloadStats().hit_rate == 0.0 and "hit rate" in str(a)
    a.reset()
    assert a == OffloadStats()
