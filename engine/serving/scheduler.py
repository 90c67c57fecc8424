"""Which requests run: a bounded FIFO queue in front of a bounded running batch. Plain Python.

Continuous batching for an encoder-decoder (STYLE.md §3, vLLM v1 scheduler, TGI router): requests
wait in arrival order; at each step boundary the engine admits as many as the batch has room for
(each is encoded once, on admission) and drops the ones that finished. The queue is bounded, so an
overloaded server answers 429 at once instead of queueing without end (vLLM #2901).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.serving.protocol import EngineOverloadedError, EngineRequest


@dataclass
class Waiting:
    """A request in the queue and when it arrived (`time.monotonic()`)."""

    request: EngineRequest
    arrival: float


@dataclass
class Scheduler:
    """Admission control; knows nothing about tensors."""

    max_running: int
    """Rows in the decode batch at most."""
    max_waiting: int
    """Requests queued at most; beyond that `submit` raises `EngineOverloadedError`."""
    waiting: deque[Waiting] = field(default_factory=deque)
    accepting: bool = True

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")

    def submit(self, request: EngineRequest, *, now: float) -> None:
        """Queue `request`, or refuse it when the queue is full."""
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloadedError(
                f"the queue is full ({self.max_waiting} requests waiting); retry shortly",
                retry_after=1.0,
            )
        self.waiting.append(Waiting(request, now))

    def cancel(self, request_id: str) -> bool:
        """Remove a waiting request; False if it is not waiting (running or unknown)."""
        for item in self.waiting:
            if item.request.request_id == request_id:
                self.waiting.remove(item)
                return True
        return False

    def expired(self, *, now: float) -> list[Waiting]:
        """Remove and return the waiting requests whose deadline has passed."""
        gone = [w for w in self.waiting if w.request.deadline is not None and w.request.deadline <= now]
        for item in gone:
            self.waiting.remove(item)
        return gone

    def admit(self, *, num_running: int) -> list[Waiting]:
        """Requests to admit now: the oldest ones, as many as the batch has room for."""
        room = max(0, self.max_running - num_running)
        admitted: list[Waiting] = []
        while self.waiting and len(admitted) < room:
            admitted.append(self.waiting.popleft())
        return admitted
