"""The fast pool: which experts occupy its slots, which are pinned, and whom to evict.

Pure bookkeeping (no tensors move here): the provider asks for a slot, the transfer engine fills it.
The pool is a cache across layers and steps, with LRFU eviction by default (each use adds a
weight that halves every `LRFU_HALF_LIFE` uses: between LRU and LFU, and on recorded traces as good
as LRU on random routers and 6 points of hit rate better on the trained demo model, see
bench/cache_policies.py), or LRU or LFU (the policies mixtral-offloading and its follow-ups
compare). Within a layer the provider passes the experts
still to run, so eviction prefers experts nobody is waiting for and, only if it must, the one
needed last (Belady's rule on the known future of the layer).
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError("the pool needs at least one slot")
        self._free = list(range(self.num_slots - 1, -1, -1))

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

    def victim(self, *, upcoming: Sequence[ExpertId] = (), spare_upcoming: bool = False) -> PoolEntry | None:
        """The entry to evict, or None if every entry is pinned or still loading.

        Entries in `upcoming` (still to run in this layer) go last, farthest first; with
        `spare_upcoming` they are never chosen.
        """
        candidates = [e for e in self.entries.values() if e.pins == 0 and not e.is_loading]
        if not candidates:
            return None
        position = {expert: i for i, expert in enumerate(upcoming)}
        idle = [e for e in candidates if e.expert not in position]
        if idle:
            if self.policy == "lfu":
                return min(idle, key=lambda e: (e.uses, e.last_use))
            if self.policy == "lrfu":
                return min(idle, key=lambda e: (e.weight_at(self._clock), e.last_use))
            return min(idle, key=lambda e: e.last_use)
        if spare_upcoming:
            return None
        return max(candidates, key=lambda e: position[e.expert])

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
            self._free.append(evicted.slot)
        # The admission counts as a use for LRFU: a prefetched expert not used yet must not be the
        # cheapest victim (weight 0) before the layer it was loaded for has run.
        entry = PoolEntry(expert=expert, slot=self._free.pop(), weight=1.0)
        self._clock += 1
        entry.last_use = self._clock
        self.entries[expert] = entry
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
        self._free.append(entry.slot)

    def loading(self) -> list[PoolEntry]:
        return [e for e in self.entries.values() if e.is_loading]
