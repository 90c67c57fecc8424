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
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.experts.pool import PoolEntry
from engine.experts.store import ALIGNMENT, BlobLocation, ExpertStore
from engine.model import ExpertWeights, MoELayerKey

#: Reads are split into chunks of at least this size so a blob keeps several reads in flight.
MIN_CHUNK_BYTES = 1 << 20
#: Seconds a "this expert is in the page cache" answer is trusted before asking the kernel again.
RESIDENCY_TTL = 1.0


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


class BlobReader:
    """`pread`s blobs into buffers with a pool of I/O threads; one file descriptor per file."""

    def __init__(self, *, threads: int, direct: bool) -> None:
        self.threads = max(1, threads)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cpm2-io")
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

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
                self._fds[path] = fd
            return fd

    def read(self, location: BlobLocation, out: torch.Tensor) -> None:
        """Fill `out` (uint8, `location.nbytes`) with the blob; blocks until every chunk is in."""
        fd = self._fd(location.path)
        total = location.nbytes
        chunk = max(MIN_CHUNK_BYTES, -(-total // self.threads))
        chunk = -(-chunk // ALIGNMENT) * ALIGNMENT
        spans = [(start, min(start + chunk, total)) for start in range(0, total, chunk)]
        futures = [self._pool.submit(self._read_span, fd, location.offset, out, a, b) for a, b in spans]
        for future in futures:
            future.result()

    @staticmethod
    def _read_span(fd: int, base: int, out: torch.Tensor, start: int, end: int) -> None:
        view = out[start:end].numpy()
        done = 0
        while done < end - start:
            n = os.preadv(fd, [view[done:].data], base + start + done)
            if n <= 0:
                raise OSError(f"short read at offset {base + start + done}")
            done += n

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
        self.store = store
        self.layout = store.layout
        self.dtype = dtype
        self.reader = BlobReader(threads=io_threads, direct=direct)
        self.page_cache = PageCache()
        # In place only when the page cache is allowed and the stored dtype is the compute dtype.
        self.allows_in_place = not direct and dtype == store.dtype and self.page_cache.available
        self._resident: dict[tuple[MoELayerKey, int], tuple[float, ExpertWeights]] = {}
        self._loads = ThreadPoolExecutor(max(1, window), thread_name_prefix="cpm2-load")
        nbytes = self.layout.nbytes
        # Experts in the stored dtype are read in place into preallocated slots; converted ones are
        # read into `window` staging buffers and converted into memory of their own.
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self.slots: torch.Tensor | None = None
        if dtype != store.dtype:
            for _ in range(max(1, window)):
                self._staging.put(aligned_empty(nbytes))
        else:
            self.slots = aligned_empty(num_slots * nbytes).view(num_slots, nbytes)
        self.busy_seconds = 0.0
        self.loads_done = 0
        self._busy_lock = threading.Lock()

    @property
    def staging_bytes(self) -> int:
        return 0 if self.slots is not None else self._staging.qsize() * self.layout.nbytes

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

    def hint(self, expert: tuple[MoELayerKey, int]) -> bool:
        """The expert will probably be needed soon: ask the kernel to read it ahead (page-cache mode)."""
        if not self.allows_in_place:
            return False
        known = self._resident.get(expert)
        if known is None or time.monotonic() - known[0] >= RESIDENCY_TTL:
            self.page_cache.will_need(self.store.mapped_blob(*expert))
        return True

    def start(self, entry: PoolEntry) -> Future[ExpertWeights]:
        """Begin loading `entry.expert` into `entry.slot`."""
        layer, expert = entry.expert
        return self._loads.submit(self._load, self.store.location(layer, expert), entry.slot)

    def _load(self, location: BlobLocation, slot: int) -> ExpertWeights:
        begin = time.perf_counter()
        if self.slots is not None:
            self.reader.read(location, self.slots[slot])
            weights = self.layout.unpack(self.slots[slot])
        else:
            staging = self._staging.get()
            try:
                self.reader.read(location, staging)
                weights = self._convert(self.layout.unpack(staging))
            finally:
                self._staging.put(staging)
        with self._busy_lock:
            self.busy_seconds += time.perf_counter() - begin
            self.loads_done += 1
        return weights

    def _convert(self, weights: ExpertWeights) -> ExpertWeights:
        """Copies of staged weights in the compute dtype."""

        def own(part: torch.Tensor | None) -> torch.Tensor | None:
            return None if part is None else part.to(self.dtype)

        wi_0, wi_1, wo = own(weights.wi_0), own(weights.wi_1), own(weights.wo)
        assert wi_0 is not None
        assert wo is not None
        return ExpertWeights(wi_0, wi_1, wo)

    def wait(self, entry: PoolEntry) -> ExpertWeights:
        """The loaded weights (blocks until the load is done)."""
        future: Future[ExpertWeights] = entry.pending
        return future.result()

    def release(self, entry: PoolEntry) -> None:
        """The expert in `entry` was computed; nothing to synchronise on the CPU."""

    def close(self) -> None:
        self._loads.shutdown(wait=True)
        self.reader.close()
