"""The fast pool: which experts occupy its slots, which are pinned, and whom to evict.

Pure bookkeeping (no tensors move here): the provider asks for a slot, the transfer engine fills it.
The pool is a cache across layers and steps, with LRFU eviction by default (each use adds a
weight that halves every `LRFU_HALF_LIFE` uses: between LRU and LFU, and on recorded traces as good
as LRU on random routers and 6 points of hit rate better on the trained demo model, see
bench/cache_policies.py), or LRU or LFU (the policies mixtral-offloading and its follow-ups
compare). Within a layer the provider passes the experts
still to run, so eviction prefers experts nobody is waiting for and, only if it must, the one
needed last (Belady's rule on the known future of the layer).

Choosing a victim is O(log slots), not a scan: each policy's order is a key that does not change
between an entry's uses (LRFU's decayed weight w * 2^-(now - t)/h orders entries as log2 w + t / h
does, whatever `now` is), so a heap holds the entries by key and an entry's use pushes a fresh record
over its stale one. An eviction took 47 us at 192 slots and 240 us at 1,000 scanning every slot in
Python, 3.6 and 4.2 us from the heap (this project's 2-vCPU EPYC VM); a step can load dozens.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.model import ExpertWeights, MoELayerKey

ExpertId = tuple[MoELayerKey, int]
CachePolicy = Literal["lrfu", "lru", "lfu"]
CACHE_POLICIES: tuple[CachePolicy, ...] = ("lrfu", "lru", "lfu")
#: LRFU's half-life in expert uses (the pool's clock): chosen on recorded traces by
#: `bench.cache_policies` (64 beat 16 and 256 on the demo model and tied LRU on the random ones).
LRFU_HALF_LIFE = 64.0


@dataclass
class PoolEntry:
    """One resident (or arriving) expert."""

    expert: ExpertId
    slot: int
    weights: ExpertWeights | None = None
    """Usable weights once the transfer is done; None while it is in flight."""
    pending: Any = None
    """The transfer engine's handle of an in-flight load."""
    pins: int = 0
    last_use: int = 0
    uses: int = 0
    weight: float = 0.0
    """LRFU: each use adds 1, halving every `LRFU_HALF_LIFE` uses of any expert (as of `last_use`)."""
    prefetched: bool = False
    simulated: bool = False
    """Admitted by a simulation (`ExpertPool.record_use`): counts as loaded, holds no weights."""
    stamp: int = 0
    """The pool's current heap record of this entry (older records of it are stale)."""

    def weight_at(self, clock: int) -> float:
        return self.weight * 0.5 ** ((clock - self.last_use) / LRFU_HALF_LIFE)

    @property
    def is_loading(self) -> bool:
        return self.weights is None and not self.simulated


@dataclass
class ExpertPool:
    """`num_slots` slots shared by all MoE layers."""

    num_slots: int
    policy: CachePolicy = "lrfu"
    entries: dict[ExpertId, PoolEntry] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)
    _clock: int = 0
    peak_used: int = 0
    """Most slots ever taken at once (a high-water mark: the budget check reads it)."""
    # (eviction key, stamp, entry), least evictable on top; records whose stamp is not their entry's
    # current one, or whose entry has left, are stale and skipped.
    _heap: list[tuple[tuple[float, int], int, PoolEntry]] = field(default_factory=list)
    _stamps: int = 0
    # Entries admitted with their load in flight, in admission order (finished ones leave lazily).
    _in_flight: dict[ExpertId, PoolEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError("the pool needs at least one slot")
        self._free = list(range(self.num_slots - 1, -1, -1))

    def _key(self, entry: PoolEntry) -> tuple[float, int]:
        """The entry's place in eviction order (smallest first) until its next use."""
        if self.policy == "lfu":
            return (float(entry.uses), entry.last_use)
        if self.policy == "lrfu":
            return (math.log2(entry.weight) + entry.last_use / LRFU_HALF_LIFE, entry.last_use)
        return (float(entry.last_use), entry.last_use)

    def _rank(self, entry: PoolEntry) -> None:
        """Push `entry`'s record after a change of its key, compacting the heap when stale records
        outnumber live ones."""
        self._stamps += 1
        entry.stamp = self._stamps
        heapq.heappush(self._heap, (self._key(entry), entry.stamp, entry))
        if len(self._heap) > 2 * len(self.entries) + 64:
            self._heap = [(self._key(e), e.stamp, e) for e in self.entries.values()]
            heapq.heapify(self._heap)

    def _is_current(self, record: tuple[tuple[float, int], int, PoolEntry]) -> bool:
        entry = record[2]
        return entry.stamp == record[1] and self.entries.get(entry.expert) is entry

    def get(self, expert: ExpertId) -> PoolEntry | None:
        return self.entries.get(expert)

    def __contains__(self, expert: ExpertId) -> bool:
        return expert in self.entries

    @property
    def num_free(self) -> int:
        return len(self._free)

    def touch(self, entry: PoolEntry) -> None:
        """Record a use (for LRU recency, LFU frequency and LRFU's decayed frequency)."""
        self._clock += 1
        entry.weight = entry.weight_at(self._clock) + 1
        entry.last_use = self._clock
        entry.uses += 1
        if self.entries.get(entry.expert) is entry:
            self._rank(entry)

    def victim(self, *, upcoming: Sequence[ExpertId] = (), spare_upcoming: bool = False) -> PoolEntry | None:
        """The entry to evict, or None if every entry is pinned or still loading.

        Entries in `upcoming` (still to run in this layer) go last, farthest first; with
        `spare_upcoming` they are never chosen.
        """
        position = {expert: i for i, expert in enumerate(upcoming)}
        # Records come off the heap in eviction order; the pinned, the loading and the awaited ones
        # (a window's worth and a layer's demand at most) go back on it.
        popped = []
        found = None
        while self._heap:
            record = heapq.heappop(self._heap)
            if not self._is_current(record):
                continue
            popped.append(record)
            entry = record[2]
            if entry.pins == 0 and not entry.is_loading and entry.expert not in position:
                found = entry
                break
        for record in popped:
            heapq.heappush(self._heap, record)
        if found is not None or spare_upcoming:
            return found
        awaited = [self.entries[e] for e in position if e in self.entries]
        candidates = [e for e in awaited if e.pins == 0 and not e.is_loading]
        return max(candidates, key=lambda e: position[e.expert], default=None)

    def admit(
        self, expert: ExpertId, *, upcoming: Sequence[ExpertId] = (), spare_upcoming: bool = False
    ) -> tuple[PoolEntry, PoolEntry | None] | None:
        """A slot for `expert`: a free one, or one taken from a victim (returned second).

        None when no slot can be had now (all pinned or loading); the caller waits for a load.
        """
        assert expert not in self.entries, f"{expert} is already in the pool"
        evicted = None
        if not self._free:
            evicted = self.victim(upcoming=upcoming, spare_upcoming=spare_upcoming)
            if evicted is None:
                return None
            del self.entries[evicted.expert]
            self._in_flight.pop(evicted.expert, None)
            self._free.append(evicted.slot)
        # The admission counts as a use for LRFU: a prefetched expert not used yet must not be the
        # cheapest victim (weight 0) before the layer it was loaded for has run.
        entry = PoolEntry(expert=expert, slot=self._free.pop(), weight=1.0)
        self._clock += 1
        entry.last_use = self._clock
        self.entries[expert] = entry
        self._rank(entry)
        self._in_flight[expert] = entry
        self.peak_used = max(self.peak_used, len(self.entries))
        return entry, evicted

    def record_use(self, expert: ExpertId, *, upcoming: Sequence[ExpertId] = ()) -> bool:
        """A use of `expert` as the provider counts it, moving no bytes (the planner replays requests
        through this pool, `engine.planner.predict`): a hit is touched; a miss takes a slot as if
        loaded at once, evicting as a load would. True on a hit."""
        entry = self.entries.get(expert)
        if entry is not None:
            self.touch(entry)
            return True
        admitted = self.admit(expert, upcoming=upcoming)
        assert admitted is not None, "a simulated pool has nothing pinned or loading"
        admitted[0].simulated = True
        return False

    def remove(self, expert: ExpertId) -> None:
        entry = self.entries.pop(expert)
        self._in_flight.pop(expert, None)
        self._free.append(entry.slot)

    def loading(self) -> list[PoolEntry]:
        """Entries whose load is still in flight, oldest first (the few admitted since the last call
        and not yet done, not a scan of every slot: the provider asks on every layer call)."""
        for expert in [k for k, e in self._in_flight.items() if not e.is_loading or self.entries.get(k) is not e]:
            del self._in_flight[expert]
        return list(self._in_flight.values())
