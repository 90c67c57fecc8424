"""The fast pool's bookkeeping (`engine.experts.pool`) and the expert counters (`engine.experts.stats`).

Invariants: LRU evicts the least recently used entry and LFU the least used one; pinned and loading
entries are never evicted; a free slot is used before any eviction; a slot is never held by two
entries, whatever sequence of admits, touches, pins and removals happens; within a layer, eviction
spares the experts still to run and otherwise takes the one needed last (Belady).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.experts.pool import CACHE_POLICIES, LRFU_HALF_LIFE, ExpertId, ExpertPool, PoolEntry
from engine.experts.stats import ExpertStats
from engine.model import ExpertWeights, MoELayerKey

LAYER = MoELayerKey("encoder", 0)
OTHER = MoELayerKey("decoder", 1)
WEIGHTS = ExpertWeights(torch.zeros(1, 1), None, torch.zeros(1, 1))


def _eid(expert: int, layer: MoELayerKey = LAYER) -> ExpertId:
    return (layer, expert)


def _resident(pool: ExpertPool, expert: ExpertId, **admit: object) -> PoolEntry:
    """Admit `expert` and mark its load done."""
    result = pool.admit(expert, **admit)  # type: ignore[arg-type]
    assert result is not None
    entry, _ = result
    entry.weights = WEIGHTS
    return entry


def _check_invariants(pool: ExpertPool) -> None:
    slots = [e.slot for e in pool.entries.values()]
    assert len(pool.entries) <= pool.num_slots
    assert len(set(slots)) == len(slots), f"a slot is held twice: {sorted(slots)}"
    assert all(0 <= s < pool.num_slots for s in slots)
    assert pool.num_free + len(pool.entries) == pool.num_slots
    assert all(key == entry.expert for key, entry in pool.entries.items())


# ---- eviction policies ------------------------------------------------------------------------------


def test_free_slots_are_used_before_any_eviction() -> None:
    pool = ExpertPool(3, "lru")
    handed = []
    for e in range(3):
        result = pool.admit(_eid(e))
        assert result is not None
        entry, evicted = result
        assert evicted is None
        entry.weights = WEIGHTS
        handed.append(entry.slot)
    assert sorted(handed) == [0, 1, 2]
    assert pool.num_free == 0
    result = pool.admit(_eid(3))
    assert result is not None
    entry, evicted = result
    assert evicted is not None
    assert entry.slot == evicted.slot
    assert evicted.expert not in pool
    _check_invariants(pool)


def test_lru_evicts_the_least_recently_touched() -> None:
    pool = ExpertPool(3, "lru")
    entries = [_resident(pool, _eid(e)) for e in range(3)]
    # Admission order 0, 1, 2; touching 0 then 1 leaves 2 the least recent.
    pool.touch(entries[0])
    pool.touch(entries[1])
    assert pool.victim() is entries[2]
    pool.touch(entries[2])
    assert pool.victim() is entries[0]
    # Use counts do not matter to LRU.
    for _ in range(5):
        pool.touch(entries[0])
    assert pool.victim() is entries[1]
    result = pool.admit(_eid(9))
    assert result is not None
    assert result[1] is entries[1]
    assert _eid(1) not in pool
    assert _eid(9) in pool


def test_lfu_evicts_the_least_used_ties_by_recency() -> None:
    pool = ExpertPool(3, "lfu")
    a, b, c = (_resident(pool, _eid(e)) for e in range(3))
    for entry, uses in ((a, 3), (b, 1), (c, 2)):
        for _ in range(uses):
            pool.touch(entry)
    assert pool.victim() is b
    pool.touch(b)  # b: 2 uses, now the most recent; c: 2 uses, older
    assert pool.victim() is c
    pool.touch(c)
    pool.touch(c)  # c: 4, a: 3, b: 2
    assert pool.victim() is b
    pool.touch(b)  # a: 3, b: 3 but more recent, c: 4
    assert pool.victim() is a


def test_lrfu_weighs_uses_by_their_age() -> None:
    """Frequent experts outlast a burst of one-off ones (unlike LRU), but old frequency fades
    (unlike LFU): a use `LRFU_HALF_LIFE` ticks ago counts half."""
    pool = ExpertPool(3, "lrfu")
    a, b, c = (_resident(pool, _eid(e)) for e in range(3))
    for _ in range(4):
        pool.touch(a)
    pool.touch(b)
    pool.touch(c)
    assert pool.victim() is b  # a: ~5, b and c: ~2, b older
    assert a.weight_at(pool._clock) == pytest.approx(
        sum(0.5 ** ((pool._clock - t) / LRFU_HALF_LIFE) for t in (1, 4, 5, 6, 7))
    )
    # Long after a's burst, recent single uses of b and c outweigh it.
    for _ in range(3 * int(LRFU_HALF_LIFE)):
        pool.touch(b)
        pool.touch(c)
    assert pool.victim() is a
    # An admitted expert not used yet (a prefetch) is not the cheapest victim right away.
    pool.remove(a.expert)
    fresh = _resident(pool, _eid(7))
    assert fresh.weight_at(pool._clock) > 0
    assert ExpertPool(1).policy == "lrfu"  # the default


@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_pinned_and_loading_entries_are_never_evicted(policy: str) -> None:
    pool = ExpertPool(3, policy)  # type: ignore[arg-type]
    pinned = _resident(pool, _eid(0))
    pinned.pins = 1
    result = pool.admit(_eid(1))
    assert result is not None
    loading = result[0]  # weights stay None: still in flight
    idle = _resident(pool, _eid(2))
    for _ in range(4):
        pool.touch(idle)  # the most recent and most used: still the only candidate
    assert pool.loading() == [loading]
    assert pool.victim() is idle
    result = pool.admit(_eid(3))
    assert result is not None
    assert result[1] is idle
    # Now every slot is pinned or loading: no admission, nothing changes.
    assert pool.victim() is None
    before = {key: e.slot for key, e in pool.entries.items()}
    assert pool.admit(_eid(4)) is None
    assert {key: e.slot for key, e in pool.entries.items()} == before
    _check_invariants(pool)
    # Unpinning, or the load finishing, makes an entry evictable again.
    pinned.pins = 0
    assert pool.victim() is pinned
    pinned.pins = 2
    loading.weights = WEIGHTS
    assert pool.victim() is loading


def test_remove_frees_the_slot() -> None:
    pool = ExpertPool(2)
    a = _resident(pool, _eid(0))
    _resident(pool, _eid(1))
    pool.remove(_eid(0))
    assert _eid(0) not in pool
    assert pool.get(_eid(0)) is None
    assert pool.num_free == 1
    result = pool.admit(_eid(5))
    assert result is not None
    assert result[1] is None, "a freed slot must be reused before evicting"
    assert result[0].slot == a.slot
    with pytest.raises(KeyError):
        pool.remove(_eid(0))


def test_pool_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="slot"):
        ExpertPool(0)


def _change(pool: ExpertPool, entry: PoolEntry, op: str) -> None:
    """One random operation on a resident `entry`: a use, a pin or unpin, its load finishing, removal."""
    if op == "touch":
        uses = entry.uses
        pool.touch(entry)
        assert entry.uses == uses + 1
    elif op == "pin":
        entry.pins += 1
    elif op == "unpin" and entry.pins:
        entry.pins -= 1
    elif op == "finish":
        entry.weights = WEIGHTS
    elif op == "remove":
        pool.remove(entry.expert)
        assert entry.expert not in pool


@pytest.mark.parametrize("policy", CACHE_POLICIES)
@pytest.mark.parametrize("seed", range(6))
def test_random_operations_never_hand_out_a_slot_twice(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    pool = ExpertPool(rng.randint(1, 5), policy)  # type: ignore[arg-type]
    experts = [_eid(e, layer) for layer in (LAYER, OTHER) for e in range(6)]
    for _ in range(400):
        op = rng.choice(["admit", "admit", "touch", "pin", "unpin", "finish", "remove"])
        present = list(pool.entries.values())
        if op == "admit":
            absent = [x for x in experts if x not in pool]
            if not absent:
                continue
            expert = rng.choice(absent)
            upcoming = rng.sample(experts, rng.randint(0, 4))
            spare = rng.random() < 0.3
            held = {e.slot: e for e in present}
            protected = {e.expert for e in present if e.pins > 0 or e.is_loading}
            result = pool.admit(expert, upcoming=upcoming, spare_upcoming=spare)
            if result is None:
                assert len(present) == pool.num_slots
                assert all(e.expert in protected or (spare and e.expert in upcoming) for e in present)
            else:
                entry, evicted = result
                if evicted is None:
                    assert entry.slot not in held, "a free slot was taken from a resident entry"
                else:
                    assert len(present) == pool.num_slots, "evicted while a slot was free"
                    assert evicted.expert not in protected, "evicted a pinned or loading entry"
                    assert not (spare and evicted.expert in upcoming)
                    assert held[entry.slot] is evicted
                    assert evicted.expert not in pool
                assert pool.get(expert) is entry
                assert entry.is_loading
        elif present:
            _change(pool, rng.choice(present), op)
        _check_invariants(pool)
    # Drain: once the old entries are evictable, filling the pool with new pinned experts uses every
    # slot exactly once.
    for entry in pool.entries.values():
        entry.pins, entry.weights = 0, WEIGHTS
    fresh = []
    for i in range(pool.num_slots):
        fresh.append(_resident(pool, _eid(100 + i)))
        fresh[-1].pins = 1
    assert sorted(e.slot for e in fresh) == list(range(pool.num_slots))
    assert set(pool.entries) == {e.expert for e in fresh}


def _scanned_victim(pool: ExpertPool, upcoming: list[ExpertId], spare: bool) -> PoolEntry | None:
    """The eviction rule written as a scan of every entry (what the pool's heap must agree with)."""
    candidates = [e for e in pool.entries.values() if e.pins == 0 and not e.is_loading]
    position = {expert: i for i, expert in enumerate(upcoming)}
    idle = [e for e in candidates if e.expert not in position]
    if idle:
        keys = {
            "lru": lambda e: (e.last_use,),
            "lfu": lambda e: (e.uses, e.last_use),
            "lrfu": lambda e: (e.weight_at(pool._clock), e.last_use),
        }
        return min(idle, key=keys[pool.policy])
    if spare or not candidates:
        return None
    return max(candidates, key=lambda e: position[e.expert])


@pytest.mark.parametrize("policy", CACHE_POLICIES)
@pytest.mark.parametrize("seed", range(4))
def test_victim_and_loading_agree_with_a_scan_of_every_entry(policy: str, seed: int) -> None:
    """The heap and the in-flight list answer as a scan of all slots would, through thousands of
    admits, uses, pins, finished loads and removals (the heap compacts several times on the way)."""
    rng = random.Random(seed)
    pool = ExpertPool(rng.randint(8, 24), policy)  # type: ignore[arg-type]
    experts = [_eid(e, layer) for layer in (LAYER, OTHER) for e in range(20)]
    for _ in range(3000):
        present = list(pool.entries.values())
        upcoming = rng.sample(experts, rng.randint(0, 6))
        spare = rng.random() < 0.3
        assert pool.victim(upcoming=upcoming, spare_upcoming=spare) is _scanned_victim(pool, upcoming, spare)
        assert pool.loading() == [e for e in pool.entries.values() if e.is_loading]
        op = rng.choice(["admit", "admit", "touch", "touch", "touch", "pin", "unpin", "finish", "remove"])
        if op == "admit":
            absent = [x for x in experts if x not in pool]
            if absent:
                pool.admit(rng.choice(absent), upcoming=upcoming, spare_upcoming=spare)
        elif present:
            _change(pool, rng.choice(present), op)
        _check_invariants(pool)
    assert len(pool._heap) <= 2 * len(pool.entries) + 65


# ---- within a layer: the known future ---------------------------------------------------------------


@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_victim_prefers_experts_not_upcoming(policy: str) -> None:
    pool = ExpertPool(4, policy)  # type: ignore[arg-type]
    entries = {e: _resident(pool, _eid(e)) for e in range(4)}
    for e in (3, 2, 2):  # 0 and 1 are the LRU / LFU choices without a future, then 3
        pool.touch(entries[e])
    assert pool.victim() is entries[0]
    # 0 and 1 are still to run in this layer: the idle 2 and 3 go first, by the cache policy.
    assert pool.victim(upcoming=[_eid(1), _eid(0)]) is entries[3]
    # Only upcoming candidates: the one needed last, whatever the cache policy says.
    assert pool.victim(upcoming=[_eid(2), _eid(0), _eid(3), _eid(1)]) is entries[1]
    assert pool.victim(upcoming=[_eid(1), _eid(3), _eid(2), _eid(0)]) is entries[0]
    entries[0].pins = 1  # pinned: not a candidate even though needed last
    assert pool.victim(upcoming=[_eid(1), _eid(3), _eid(2), _eid(0)]) is entries[2]
    entries[0].pins = 0
    # spare_upcoming never picks an upcoming one, but still evicts idle ones.
    upcoming = [_eid(e) for e in range(4)]
    assert pool.victim(upcoming=upcoming, spare_upcoming=True) is None
    assert pool.admit(_eid(7), upcoming=upcoming, spare_upcoming=True) is None
    assert pool.victim(upcoming=upcoming[:3], spare_upcoming=True) is entries[3]
    result = pool.admit(_eid(7), upcoming=upcoming, spare_upcoming=False)
    assert result is not None
    assert result[1] is entries[3], "without sparing, the expert needed last is evicted"
    # Experts of another layer with the same index are not "upcoming".
    assert pool.victim(upcoming=[_eid(e, OTHER) for e in range(4)]) is not None


# ---- counters ---------------------------------------------------------------------------------------


def test_stats_arithmetic_and_derived_rates() -> None:
    before = ExpertStats(hits=2, misses=1, transfers=3, bytes_moved=300, stall_seconds=0.5)
    after = ExpertStats(
        layer_calls=4,
        hits=8,
        misses=3,
        transfers=7,
        bytes_moved=700,
        predicted=10,
        predicted_used=6,
        needed_after_prediction=8,
        stall_seconds=1.5,
        transfer_seconds=5.0,
    )
    delta = after - before
    assert (delta.hits, delta.misses, delta.transfers, delta.bytes_moved) == (6, 2, 4, 400)
    assert delta.layer_calls == 4
    assert delta.stall_seconds == pytest.approx(1.0)
    assert delta + before == after
    snapshot = after.snapshot()
    assert snapshot == after
    assert snapshot is not after
    snapshot.hits += 1
    assert after.hits == 8
    assert delta.hit_rate == pytest.approx(6 / 8)
    # Experts computed in place from the page cache were not transferred either.
    assert ExpertStats(hits=1, in_place=2, misses=1).hit_rate == pytest.approx(3 / 4)
    assert after.prefetch_precision == pytest.approx(0.6)
    assert after.prefetch_recall == pytest.approx(0.75)
    assert after.overlap == pytest.approx(1 - 1.5 / 5.0)


def test_stats_per_layer() -> None:
    """Per-layer counters subtract and add per layer (a layer seen only later counts from zero) and
    a snapshot does not share them with the live counters."""
    live = ExpertStats()
    live.layer("encoder.1").hits += 2
    before = live.snapshot()
    live.layer("encoder.1").hits += 1
    decoder = live.layer("decoder.1")
    decoder.misses, decoder.predicted, decoder.predicted_used, decoder.needed_after_prediction = 3, 4, 3, 6
    assert before.layers["encoder.1"].hits == 2
    delta = live - before
    assert delta.layers["encoder.1"].hits == 1
    assert delta.layers["decoder.1"].prefetch_precision == pytest.approx(0.75)
    assert delta.layers["decoder.1"].prefetch_recall == pytest.approx(0.5)
    assert delta.layers["decoder.1"].hit_rate == 0.0
    assert delta + before == live
    table = live.layers_to_dict()
    assert list(table) == ["encoder.1", "decoder.1"]  # model order
    assert table["decoder.1"]["prefetch_precision"] == pytest.approx(0.75)
    assert "layers" not in live.to_dict()
    totals = live.totals()  # the generator's per-step snapshot: the scalar counters, no table
    assert totals.layers == {}
    assert totals.to_dict() == live.to_dict()


def test_stats_edge_cases() -> None:
    empty = ExpertStats()
    assert empty.hit_rate == 1.0  # nothing looked up: nothing missed
    assert empty.prefetch_precision == 0.0
    assert empty.prefetch_recall == 0.0
    assert empty.overlap == 1.0  # nothing transferred: nothing to hide
    assert ExpertStats(stall_seconds=3.0, transfer_seconds=1.0).overlap == 0.0
    assert ExpertStats(misses=4).hit_rate == 0.0


def test_stats_to_dict() -> None:
    stats = ExpertStats(hits=3, misses=1, transfer_seconds=2.0, stall_seconds=0.5)
    data = stats.to_dict()
    fields = {f.name for f in dataclasses.fields(ExpertStats)} - {"layers"}
    assert set(data) == fields | {"hit_rate", "prefetch_precision", "prefetch_recall", "overlap"}
    assert data["hits"] == 3
    assert data["hit_rate"] == pytest.approx(0.75)
    assert data["overlap"] == pytest.approx(0.75)
    assert all(isinstance(v, int | float) for v in data.values())
