"""CPU transfers: expert blobs read from the store (disk tier) into the RAM pool by I/O threads.

The store is memory-mapped, so the kernel's page cache may already hold an expert in RAM. Copying
it into the pool would then cost memory bandwidth and CPU time that compute needs (on a 2-core
machine the copy and the GEMMs fight over the same cores), for no gain: so an expert whose pages
are all resident (`mincore`) is computed in place from the mapping, zero-copy, exactly as resident
experts are (Fiddler's rule: move weights only when that is cheaper than using them where they
are). Only experts that would come from storage are read into the pool. With O_DIRECT the page
cache is bypassed entirely and every miss is read, which keeps RAM use strictly to the budget.

A load is one `pread` per chunk of the blob, several chunks in flight (a virtual disk gives several
times more bandwidth with several reads outstanding: research/offload-anchors.md §3.3), optionally
with O_DIRECT so the page cache neither hides the disk nor grows outside the budget. The blob lands
directly in its preallocated pool slot, in the store's layout, which is also the layout resident
experts compute from: offloaded and resident experts run the same kernel on the same bytes, so
offloading changes no result. Only when the compute dtype differs from the stored one does a blob
go through one of `window` staging buffers to be converted. `os.preadv` releases the GIL, so loads
run while the main thread computes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.experts.blob import ALIGNMENT
from engine.experts.pool import PoolEntry
from engine.experts.store import BlobLocation, ExpertStore
from engine.model import ExpertWeights, MoELayerKey
from engine.model.ffn import Weight

#: Reads are split into chunks of at least this size so a blob keeps several reads in flight.
MIN_CHUNK_BYTES = 1 << 20
#: Seconds a "this expert is in the page cache" answer is trusted before asking the kernel again.
RESIDENCY_TTL = 1.0
#: The interpreter's thread switch interval while experts are read in the background (seconds).
GIL_SWITCH_INTERVAL = 0.0005
#: Elements per copy when an I/O thread converts a staged blob: under torch's parallel threshold
#: (`at::internal::GRAIN_SIZE`, 32768), so the cast runs on the I/O thread alone. A parallel cast
#: there would start an OpenMP team that lives as long as the thread, and a second live team slows
#: every parallel region of the compute thread (`engine.serving.threads` has the measurement).
SERIAL_CAST_ELEMENTS = 16384


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Evict `paths` from the page cache, so the next read of them comes from storage (pages mapped
    by a live mmap may survive)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class PageCache:
    """Asks the kernel whether mapped memory is resident (`mincore`) and to read it ahead (`madvise`)."""

    _MADV_WILLNEED = 3

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
        if self._libc is not None:
            self._libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            self._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    @property
    def available(self) -> bool:
        return self._libc is not None

    def _span(self, tensor: torch.Tensor) -> tuple[int, int]:
        addr = tensor.data_ptr()
        start = addr - addr % self.page
        return start, addr + tensor.numel() * tensor.element_size() - start

    def is_resident(self, tensor: torch.Tensor) -> bool:
        """Whether every page of `tensor` (a view of a mapped file) is in RAM."""
        if self._libc is None:
            return False
        start, length = self._span(tensor)
        vec = np.zeros(-(-length // self.page), dtype=np.uint8)
        if self._libc.mincore(start, length, vec.ctypes.data) != 0:
            return False
        return bool((vec & 1).all())

    def resident_bytes(self, address: int, length: int) -> int:
        """Bytes of the page-aligned mapped range [address, address + length) that are in RAM."""
        if self._libc is None or length == 0:
            return 0
        vec = np.zeros(-(-length // self.page), dtype=np.uint8)
        if self._libc.mincore(address, length, vec.ctypes.data) != 0:
            return 0
        return int((vec & 1).sum()) * self.page

    def will_need(self, tensor: torch.Tensor) -> None:
        """Start asynchronous readahead of `tensor`'s pages (a hint; never blocks)."""
        if self._libc is not None:
            start, length = self._span(tensor)
            self._libc.madvise(start, length, self._MADV_WILLNEED)


def aligned_empty(nbytes: int, *, alignment: int = ALIGNMENT) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose data starts on an `alignment` boundary (O_DIRECT needs it)."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    start = (-raw.data_ptr()) % alignment
    return raw[start : start + nbytes]


def cast_serially(source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`source.to(dtype)` in copies of `SERIAL_CAST_ELEMENTS`, each on the calling thread alone."""
    out = torch.empty(source.shape, dtype=dtype)
    flat_out, flat_source = out.view(-1), source.reshape(-1)
    for start in range(0, flat_source.numel(), SERIAL_CAST_ELEMENTS):
        stop = start + SERIAL_CAST_ELEMENTS
        flat_out[start:stop].copy_(flat_source[start:stop])
    return out


class BlobReader:
    """`pread`s blobs in chunks on a pool of I/O threads, demand reads before prefetch reads.

    Chunks wait in one priority queue, so a prefetch (a guess) never delays a read that compute is
    waiting for by more than the chunk already in flight on each thread.
    """

    def __init__(self, *, threads: int, direct: bool) -> None:
        self.threads = max(1, threads)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._queue: queue.PriorityQueue[tuple[int, int, _Chunk | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._workers = [
            threading.Thread(target=self._work, name=f"cpm2-io-{i}", daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                flags = os.O_RDONLY
                if self.direct:
                    try:
                        fd = os.open(path, flags | os.O_DIRECT)
                    except OSError:  # e.g. tmpfs has no O_DIRECT: fall back to buffered reads
                        self.direct = False
                if fd is None:
                    fd = os.open(path, flags)
                    # Reads here are exact, whole blobs: kernel readahead around them (up to
                    # read_ahead_kb, often MBs) would read neighbouring experts nobody asked for.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[path] = fd
            return fd

    def submit(
        self,
        location: BlobLocation,
        out: torch.Tensor,
        *,
        priority: int = 0,
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Read the blob into `out` (uint8, `location.nbytes`); `done(error)` runs when it is in."""
        fd = self._fd(location.path)
        total = location.nbytes
        chunk = max(MIN_CHUNK_BYTES, -(-total // self.threads))
        chunk = -(-chunk // ALIGNMENT) * ALIGNMENT
        spans = [(start, min(start + chunk, total)) for start in range(0, total, chunk)]
        read = _Read(remaining=len(spans), done=done)
        for a, b in spans:
            self._queue.put((priority, next(self._order), _Chunk(fd, location.offset, out, a, b, read)))

    def read(self, location: BlobLocation, out: torch.Tensor) -> None:
        """Fill `out` with the blob, blocking until every chunk is in."""
        finished: Future[None] = Future()

        def done(error: BaseException | None) -> None:
            if error is None:
                finished.set_result(None)
            else:
                finished.set_exception(error)

        self.submit(location, out, done=done)
        finished.result()

    def _work(self) -> None:
        while True:
            _, _, chunk = self._queue.get()
            if chunk is None:
                return
            error: BaseException | None = None
            try:
                chunk.run()
            except BaseException as exc:  # handed to the waiting caller, not lost in a thread
                error = exc
            chunk.read.finish_one(error)

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put((2**31, next(self._order), None))
        for worker in self._workers:
            worker.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class _Read:
    """A blob being read: how many chunks are still out, and whom to tell."""

    remaining: int
    done: Callable[[BaseException | None], None]
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish_one(self, error: BaseException | None) -> None:
        with self.lock:
            self.error = self.error or error
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.done(self.error)


@dataclass
class _Chunk:
    fd: int
    base: int
    out: torch.Tensor
    start: int
    end: int
    read: _Read

    def run(self) -> None:
        view = self.out[self.start : self.end].numpy()
        done = 0
        while done < self.end - self.start:
            n = os.preadv(self.fd, [view[done:].data], self.base + self.start + done)
            if n <= 0:
                raise OSError(f"short read at offset {self.base + self.start + done}")
            done += n


class CpuTransfers:
    """Moves experts from the store into the RAM pool; `start` is asynchronous, `wait` blocks."""

    def __init__(
        self,
        store: ExpertStore,
        *,
        num_slots: int,
        window: int,
        dtype: torch.dtype,
        io_threads: int = 4,
        direct: bool = False,
    ) -> None:
        # A finished read is handed back by an I/O thread, which needs the GIL to do so; with the
        # default 5 ms switch interval the main thread's Python keeps it long enough to add
        # milliseconds to every load (measured: stall per decode step 12 ms → 7 ms at 0.5 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        self.store = store
        self.layout = store.layout
        self.dtype = dtype
        self.window = max(1, window)
        self.reader = BlobReader(threads=io_threads, direct=direct)
        self.page_cache = PageCache()
        # Blobs compute as stored when the compute dtype is the stored one, or the store is quantised.
        self.as_stored = store.layout.for_compute(dtype) == store.layout
        # In place only when the page cache is allowed and the blobs compute as stored.
        self.allows_in_place = not direct and self.as_stored and self.page_cache.available
        self._resident: dict[tuple[MoELayerKey, int], tuple[float, ExpertWeights]] = {}
        nbytes = self.layout.nbytes
        # Experts in the stored dtype are read in place into preallocated slots; converted ones are
        # read into `window` staging buffers and converted into memory of their own (loads beyond
        # `window` wait for a buffer).
        self._staging: list[torch.Tensor] = []
        self._waiting: list[_Load] = []
        self._staging_lock = threading.Lock()
        self.slots: torch.Tensor | None = None
        if not self.as_stored:
            self._staging = [aligned_empty(nbytes) for _ in range(max(1, window))]
        else:
            self.slots = aligned_empty(num_slots * nbytes).view(num_slots, nbytes)
        # Link time, as on CUDA's copy stream: the time at least one read was in flight. Per-load
        # wall times would count a load's wait behind the others sharing the disk, several times
        # over when `window` loads are in flight, and make a transfer look that much slower.
        self.busy_seconds = 0.0
        self.loads_done = 0
        self._in_flight = 0
        self._busy_mark = 0.0
        self._busy_lock = threading.Lock()

    @property
    def staging_bytes(self) -> int:
        return 0 if self.slots is not None else self.window * self.layout.nbytes

    def memory(self, held_bytes: int) -> tuple[int, int]:
        """(pool bytes, mapped-store bytes in RAM): the slots, or the staging buffers plus the
        converted experts held; and the store's mapped pages the page cache holds (`mincore`), which
        page-cache mode computes from in place."""
        pool = self.slots.numel() if self.slots is not None else self.staging_bytes + held_bytes
        return pool, sum(self.page_cache.resident_bytes(a, n) for a, n in self.store.mapped_ranges())

    def in_place(self, expert: tuple[MoELayerKey, int]) -> ExpertWeights | None:
        """The expert's weights straight from the mapped store, if all its pages are in RAM.

        `mincore` over a 4 MiB blob costs ~55 µs, a lot per expert per step, so a positive answer
        is trusted for `RESIDENCY_TTL` seconds. Pages evicted within that window only cost page
        faults (a slower step), never a wrong result.
        """
        if not self.allows_in_place:
            return None
        now = time.monotonic()
        known = self._resident.get(expert)
        if known is not None and now - known[0] < RESIDENCY_TTL:
            return known[1]
        blob = self.store.mapped_blob(*expert)
        if not self.page_cache.is_resident(blob):
            self._resident.pop(expert, None)
            return None
        weights = self.layout.unpack(blob)
        self._resident[expert] = (now, weights)
        return weights

    @property
    def takes_hints(self) -> bool:
        return self.allows_in_place

    def hint(self, expert: tuple[MoELayerKey, int]) -> bool:
        """The expert will probably be needed soon: ask the kernel to read it ahead (page-cache mode)."""
        if not self.allows_in_place:
            return False
        known = self._resident.get(expert)
        if known is None or time.monotonic() - known[0] >= RESIDENCY_TTL:
            self.page_cache.will_need(self.store.mapped_blob(*expert))
        return True

    def start(self, entry: PoolEntry, *, prefetch: bool = False) -> Future[ExpertWeights]:
        """Begin loading `entry.expert` into `entry.slot`; prefetches queue behind demand reads."""
        layer, expert = entry.expert
        load = _Load(self.store.location(layer, expert), entry.slot, priority=1 if prefetch else 0)
        if self.slots is not None:
            self._submit(load, self.slots[entry.slot])
        else:
            with self._staging_lock:
                staging = self._staging.pop() if self._staging else None
                if staging is None:
                    self._waiting.append(load)
            if staging is not None:
                self._submit(load, staging)
        return load.future

    def _link_event(self, change: int) -> None:
        """A read was submitted (+1) or finished (-1): bank the link time since the last event."""
        now = time.perf_counter()
        with self._busy_lock:
            if self._in_flight > 0:
                self.busy_seconds += now - self._busy_mark
            self._busy_mark = now
            self._in_flight += change
            if change < 0:
                self.loads_done += 1

    def _submit(self, load: _Load, buffer: torch.Tensor) -> None:
        self._link_event(+1)

        def done(error: BaseException | None) -> None:
            self._finish(load, buffer, error)

        self.reader.submit(load.location, buffer, priority=load.priority, done=done)

    def _finish(self, load: _Load, buffer: torch.Tensor, error: BaseException | None) -> None:
        """Runs on the I/O thread that read the last chunk."""
        weights: ExpertWeights | None = None
        try:
            if error is None:
                unpacked = self.layout.unpack(buffer)
                weights = unpacked if self.slots is not None else self._convert(unpacked)
        except BaseException as exc:
            error = exc
        if self.slots is None:
            self._release_staging(buffer)
        self._link_event(-1)
        if error is not None:
            load.future.set_exception(error)
        else:
            assert weights is not None
            load.future.set_result(weights)

    def _release_staging(self, buffer: torch.Tensor) -> None:
        with self._staging_lock:
            waiting = self._waiting.pop(0) if self._waiting else None
            if waiting is None:
                self._staging.append(buffer)
        if waiting is not None:
            self._submit(waiting, buffer)

    def _convert(self, weights: ExpertWeights) -> ExpertWeights:
        """Copies of staged (float) weights in the compute dtype."""

        def own(part: Weight | None) -> torch.Tensor | None:
            if part is None:
                return None
            assert isinstance(part, torch.Tensor)  # a quantised store computes as stored, never staged
            return cast_serially(part, self.dtype)

        wi_0, wo = own(weights.wi_0), own(weights.wo)
        assert wi_0 is not None
        assert wo is not None
        return ExpertWeights(
            wi_0, own(weights.wi_1), wo, bi_0=own(weights.bi_0), bi_1=own(weights.bi_1), bo=own(weights.bo)
        )

    def wait(self, entry: PoolEntry) -> ExpertWeights:
        """The loaded weights (blocks until the load is done)."""
        future: Future[ExpertWeights] = entry.pending
        return future.result()

    def release(self, entry: PoolEntry) -> None:
        """The expert in `entry` was computed; nothing to synchronise on the CPU."""

    def close(self) -> None:
        self.reader.close()


@dataclass
class _Load:
    """One expert on its way into the pool."""

    location: BlobLocation
    slot: int
    priority: int
    future: Future[ExpertWeights] = field(default_factory=Future)
