"""Which requests run: a bounded FIFO queue in front of a bounded running batch. Plain Python.

Continuous batching for an encoder-decoder (STYLE.md §3, vLLM v1 scheduler, TGI router): requests
wait in arrival order; at each step boundary the engine admits as many as the batch has room for
(each is encoded once, on admission) and drops the ones that finished. The queue is bounded, so an
overloaded server answers 429 at once instead of queueing without end (vLLM #2901).

Encoding pauses every running row, and encoding k requests together costs much less than k
times one (the encoder's weights, experts included, are read once). So while a batch runs, new
requests may wait to be encoded together (TGI's `waiting_served_ratio` / `max_waiting_tokens`):
they are admitted once they are at least `waiting_served_ratio` × the running rows, or fill the
free room, or have waited `max_waiting_steps` decode steps. Ratio 0 admits at every step.

With `max_prefill_tokens` set, one admission encodes at most that many encoder tokens (input, pair
and virtual tokens; always at least one request), so a burst of arrivals pauses the running rows for
one bounded encoder pass per step and is encoded in chunks between decode steps (vLLM's chunked
prefill and `max_num_batched_tokens`, at request granularity: an encoder pass is not split within a
request). The first chunk starts decoding while the rest wait. It is off by default: on the serving
benchmark (CPU, MoE encoder) a budget of 2048 tokens brought the median time to first token at 64
clients to 0.6x and cost 13 % of the throughput, because every chunk reads the encoder's experts
again (docs/serving.md).
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
    waiting_served_ratio: float = 0.0
    """While rows run, admit only when waiting >= this × running (or the limits below)."""
    max_waiting_steps: int = 20
    """...or once the queue has waited this many decode steps."""
    max_prefill_tokens: int = 0
    """Encoder tokens admitted at once at most (at least one request is); 0: no limit."""
    waiting: deque[Waiting] = field(default_factory=deque)
    accepting: bool = True
    steps_waited: int = 0
    """Decode steps since the last admission."""

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        if self.waiting_served_ratio < 0 or self.max_waiting_steps < 0:
            raise ValueError("waiting_served_ratio and max_waiting_steps must be >= 0")
        if self.max_prefill_tokens < 0:
            raise ValueError("max_prefill_tokens must be >= 0 (0: no limit)")

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

    def note_step(self) -> None:
        """One decode step ran."""
        self.steps_waited += 1

    def admit(self, *, num_running: int) -> list[Waiting]:
        """Requests to admit now: the oldest ones, as many as the batch has room for."""
        room = max(0, self.max_running - num_running)
        if not self.waiting or not room:
            return []
        held = (
            num_running > 0
            and len(self.waiting) < room
            and len(self.waiting) < self.waiting_served_ratio * num_running
            and self.steps_waited < self.max_waiting_steps
        )
        if held:
            return []
        admitted: list[Waiting] = []
        tokens = 0
        while self.waiting and len(admitted) < room:
            cost = encoder_tokens(self.waiting[0].request)
            if admitted and self.max_prefill_tokens and tokens + cost > self.max_prefill_tokens:
                break  # the rest are encoded after the next decode step
            admitted.append(self.waiting.popleft())
            tokens += cost
        self.steps_waited = 0
        return admitted


def encoder_tokens(request: EngineRequest) -> int:
    """Tokens `request`'s encoder pass runs: its input and pair ids and its prompt's virtual tokens."""
    virtual = request.prompt.encoder_tokens if request.prompt is not None else 0
    return len(request.input_ids) + len(request.pair_ids) + virtual
