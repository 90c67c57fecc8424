"""The engine thread: admits requests at step boundaries, runs decode steps, hands out token events.

All model work happens on this one thread (torch releases the GIL, so the server's event loop stays
responsive). Each step: take new submissions and cancellations, drop expired and cancelled
requests, run the admitted requests' encoder pass (at once, or with `encoder_step_share` a slice of
its blocks per step while rows decode; a failing request is isolated and fails alone), run one
decoder step for every running row, and deliver each row's token through its sink.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.generation import DecodeBatch, GenerationRequest, Generator, Prefill, Sequence
from engine.generation.beam import beam_search
from engine.prompts import SoftPrompt
from engine.serving.protocol import (
    EngineRequest,
    EngineStats,
    EngineUnavailableError,
    GenerationFailedError,
    RequestTimeoutError,
    StepListener,
    StepRecord,
    TokenEvent,
)
from engine.serving.scheduler import Scheduler, Waiting, encoder_tokens

log = logging.getLogger("cpm2.engine")

Sink = Callable[[TokenEvent | Exception], None]


@dataclass
class _Running:
    request: EngineRequest
    sink: Sink
    arrival: float
    admitted: float


@dataclass
class _Admission:
    """Admitted requests whose encoder pass is under way, a slice of blocks per decode step."""

    prefill: Prefill
    items: list[Waiting]


class EngineLoop(threading.Thread):
    """Owns the model, the running batch and the scheduler; everything else talks to it by message."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_running: int,
        max_waiting: int,
        waiting_served_ratio: float = 0.0,
        max_waiting_steps: int = 20,
        max_prefill_tokens: int = 0,
        encoder_step_share: float = 0.0,
        special_ids: frozenset[int],
        expert_stats: Callable[[], tuple[dict[str, float], dict[str, dict[str, float]]]] | None = None,
    ) -> None:
        super().__init__(name="cpm2-engine", daemon=True)
        if not encoder_step_share >= 0:
            raise ValueError("encoder_step_share must be >= 0 (0: a whole encoder pass at once)")
        self.generator = generator
        self.encoder_step_share = encoder_step_share
        self._decode_seconds = 0.0
        """A moving average of the decode step's time: what bounds an encoder slice."""
        self.special_ids = special_ids
        self.expert_stats = expert_stats
        self.scheduler = Scheduler(
            max_running=max_running,
            max_waiting=max_waiting,
            waiting_served_ratio=waiting_served_ratio,
            max_waiting_steps=max_waiting_steps,
            max_prefill_tokens=max_prefill_tokens,
        )
        self._sinks: dict[str, tuple[Sink, float]] = {}
        self._running: dict[str, _Running] = {}
        self._cancel: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.batch: DecodeBatch | None = None
        self._admission: _Admission | None = None
        self.stats = EngineStats()
        self.step_listeners: list[StepListener] = []
        self.alive_at = time.monotonic()
        self.failure: BaseException | None = None

    # ---- called from other threads -----------------------------------------------------------

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Queue a request (raises EngineOverloadedError / EngineUnavailableError synchronously)."""
        now = time.monotonic()
        with self._lock:
            if not self.scheduler.accepting:
                raise EngineUnavailableError("the server is draining; retry on another replica", retry_after=5.0)
            self.scheduler.submit(request, now=now)
            self._sinks[request.request_id] = (sink, now)
            self.stats.waiting = len(self.scheduler.waiting)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary (no more events are delivered for it)."""
        self._cancel.put(request_id)
        self._wake.set()

    def stop_accepting(self) -> None:
        with self._lock:
            self.scheduler.accepting = False

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting) + len(self._running)

    def snapshot(self) -> EngineStats:
        """A copy of the stats."""
        with self._lock:
            stats = EngineStats(**self.stats.__dict__)
        if self.expert_stats is not None:
            stats.experts, stats.expert_layers = self.expert_stats()
        return stats

    # ---- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        # Every step of this thread runs in inference mode (thread-local): no autograd bookkeeping on
        # any op, measured 10-15 % off a batch-1 decode step of the serving benchmark's model.
        with torch.inference_mode():
            self._run()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.alive_at = time.monotonic()
                self._apply_cancellations()
                self._expire()
                self._admit()
                if self.batch is not None and len(self.batch):
                    self._step()
                elif self._admission is None:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as exc:  # the engine thread must never die silently
            log.exception("engine loop failed")
            self.failure = exc
            self._fail_everything(GenerationFailedError(f"the engine failed: {exc}"))
        finally:
            self._fail_everything(EngineUnavailableError("the engine stopped"))

    def _apply_cancellations(self) -> None:
        cancelled: set[str] = set()
        while True:
            try:
                cancelled.add(self._cancel.get_nowait())
            except queue.Empty:
                break
        if not cancelled:
            return
        with self._lock:
            for request_id in list(cancelled):
                if self.scheduler.cancel(request_id):
                    self._sinks.pop(request_id, None)
                    self.stats.requests_cancelled += 1
                    cancelled.discard(request_id)
        self._remove_running(cancelled, counter="requests_cancelled")

    def _remove_running(self, request_ids: set[str], *, counter: str, error: Exception | None = None) -> None:
        present = [rid for rid in request_ids if rid in self._running]
        if not present:
            return
        # Rows still being encoded are not in the batch yet; they are dropped when their pass ends.
        if self.batch is not None:
            rows = [i for i, s in enumerate(self.batch.sequences) if s.request.request_id in request_ids]
            if rows:
                self.batch.remove(rows)
        for rid in present:
            running = self._running.pop(rid)
            if error is not None:
                running.sink(error)
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        with self._lock:
            self.stats.running = len(self._running)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = self.scheduler.expired(now=now)
            for item in expired:
                sink, _ = self._sinks.pop(item.request.request_id, (None, 0.0))
                if sink is not None:
                    sink(RequestTimeoutError("the request's deadline passed while it was queued"))
                self.stats.requests_timed_out += 1
        late = {rid for rid, r in self._running.items() if r.request.deadline is not None and r.request.deadline <= now}
        if late:
            self._remove_running(
                late, counter="requests_timed_out", error=RequestTimeoutError("the request's deadline passed")
            )

    def _admit(self) -> None:
        if self._admission is None:
            self._start_admission()
        if self._admission is not None:
            self._continue_admission(self._admission)
        with self._lock:
            self.stats.running = len(self._running)

    def _start_admission(self) -> None:
        with self._lock:
            admitted = self.scheduler.admit(num_running=len(self._running))
            sinks = {w.request.request_id: self._sinks.pop(w.request.request_id) for w in admitted}
            self.stats.waiting = len(self.scheduler.waiting)
        if not admitted:
            return
        now = time.monotonic()
        beams = [w for w in admitted if w.request.params.num_beams > 1]
        plain = [w for w in admitted if w.request.params.num_beams == 1]
        for item in beams:
            sink, arrival = sinks[item.request.request_id]
            self._run_beam(item, sink, arrival)
        if not plain:
            return
        for item in plain:
            sink, arrival = sinks[item.request.request_id]
            self._running[item.request.request_id] = _Running(item.request, sink, arrival, now)
        try:
            prefill = self.generator.begin_prefill([self._generation_request(w.request) for w in plain])
        except Exception:
            self._admit_one_by_one(plain)
            return
        self._admission = _Admission(prefill, plain)

    def _continue_admission(self, admission: _Admission) -> None:
        """Run the next slice of the admission's encoder pass; at its end the rows join the batch.

        With rows decoding, a slice runs blocks while they fit in `encoder_step_share` of a decode
        step (at least one block; 0: the whole pass), so that newcomers lengthen the running rows'
        gaps between tokens by that share at most; with none decoding, the whole pass runs at once.
        """
        limit = float("inf")
        if self.encoder_step_share and self.batch is not None and len(self.batch):
            limit = self.encoder_step_share * self._decode_seconds
        first = admission.prefill.encoder.blocks_done == 0
        begin = time.perf_counter()
        try:
            if limit == float("inf"):
                done = self.generator.advance_prefill(admission.prefill, len(self.generator.model.encoder.blocks))
            else:
                done = self._run_blocks(admission, within=limit)
            batch = self.generator.finish_prefill(admission.prefill) if done else None
        except Exception:
            # The pass ran every admitted request at once; find the one that fails, alone.
            self._admission = None
            self._admit_one_by_one(admission.items)
            return
        tokens = sum(encoder_tokens(w.request) for w in admission.items) if first else 0
        prompts = [w.request.prompt for w in admission.items]
        self._record("encode", prompts, time.perf_counter() - begin, tokens=tokens)
        if batch is not None:
            self._admission = None
            self._join(batch)

    def _run_blocks(self, admission: _Admission, *, within: float) -> bool:
        """Run the admission's next blocks while the next one, expected to take as long as the last,
        ends within `within` seconds (at least one block); True once the pass is done."""
        begin = time.perf_counter()
        while True:
            block_begin = time.perf_counter()
            done = self.generator.advance_prefill(admission.prefill, 1)
            now = time.perf_counter()
            if done or now - begin + (now - block_begin) > within:
                return done

    def _admit_one_by_one(self, admitted: list[Waiting]) -> None:
        """Encode each request alone (after a batched pass failed), so only a bad one fails."""
        if len(admitted) == 1:
            self._fail(admitted[0].request.request_id, "encoding")
            return
        for item in admitted:
            if item.request.request_id not in self._running:
                continue  # cancelled or expired meanwhile
            begin = time.perf_counter()
            try:
                single = self.generator.prefill([self._generation_request(item.request)])
            except Exception:
                self._fail(item.request.request_id, "encoding")
                continue
            seconds = time.perf_counter() - begin
            self._record("encode", [item.request.prompt], seconds, tokens=encoder_tokens(item.request))
            self._join(single)

    def _join(self, batch: DecodeBatch) -> None:
        """Add freshly encoded rows to the running batch, less any cancelled or expired meanwhile."""
        gone = [i for i, s in enumerate(batch.sequences) if s.request.request_id not in self._running]
        if gone:
            batch.remove(gone)
        if not len(batch):
            return
        if self.batch is None or not len(self.batch):
            self.batch = batch
        else:
            self.batch.extend(batch)

    def _fail(self, request_id: str, stage: str) -> None:
        log.exception("request %s failed during %s", request_id, stage)
        running = self._running.pop(request_id, None)
        if running is not None:
            running.sink(GenerationFailedError(f"generation failed during {stage}; the request was not completed"))
        self.stats.requests_failed += 1

    @staticmethod
    def _generation_request(request: EngineRequest) -> GenerationRequest:
        return GenerationRequest(
            request.input_ids, request.params, request.request_id, request.pair_ids, request.prompt
        )

    def _run_beam(self, item: Waiting, sink: Sink, arrival: float) -> None:
        """Beam search runs to completion on its own (it is not streamed token by token)."""
        request = item.request
        admitted = time.monotonic()
        try:
            result = beam_search(
                self.generator.model,
                self._generation_request(request),
                tokenizer=self.generator.tokenizer,
                num_choosable=self.generator.num_choosable,
            )
        except Exception:
            log.exception("beam search failed for %s", request.request_id)
            sink(GenerationFailedError("beam search failed; the request was not completed"))
            self.stats.requests_failed += 1
            return
        tokenizer = self.generator.tokenizer
        for i, (token, logprob) in enumerate(zip(result.token_ids, result.logprobs, strict=True), start=1):
            last = i == len(result.token_ids)
            sink(
                TokenEvent(
                    request_id=request.request_id,
                    index=i,
                    token_id=token,
                    text="" if token in self.special_ids or tokenizer is None else tokenizer.decode([token]),
                    logprob=logprob,
                    special=token in self.special_ids,
                    finish_reason=result.finish_reason if last else None,
                    generated_text=result.text if last else None,
                    alternatives=tuple(a.text for a in result.alternatives) if last else (),
                    num_input_tokens=len(request.input_ids) + len(request.pair_ids),
                    num_virtual_tokens=request.prompt.encoder_tokens if request.prompt else 0,
                    queue_seconds=admitted - arrival,
                )
            )
        self._count_finished(len(result.token_ids), request)

    def _count_finished(self, generated: int, request: EngineRequest) -> None:
        with self._lock:
            self.stats.requests_finished += 1
            self.stats.generated_tokens_total += generated
            self.stats.prompt_tokens_total += len(request.input_ids) + len(request.pair_ids)
            self.stats.virtual_tokens_total += request.prompt.encoder_tokens if request.prompt else 0

    def _step(self) -> None:
        assert self.batch is not None
        begin = time.perf_counter()
        try:
            self.generator.step(self.batch)
        except Exception:
            # A step runs every row at once, so its failure cannot be pinned on one request.
            log.exception("decode step failed; failing the %d running requests", len(self.batch))
            failed = {s.request.request_id for s in self.batch.sequences}
            self._remove_running(failed, counter="requests_failed", error=GenerationFailedError("decode step failed"))
            self.batch = None
            return
        seconds = time.perf_counter() - begin
        # Recent steps weigh most: the batch's size, and with it the step's time, changes as rows come and go.
        self._decode_seconds = seconds if not self._decode_seconds else 0.8 * self._decode_seconds + 0.2 * seconds
        self._record("decode", [s.request.prompt for s in self.batch.sequences], seconds, tokens=len(self.batch))
        broken: set[str] = set()
        for sequence in self.batch.sequences:
            try:
                self._emit(sequence)
            except Exception:
                # One row's token or result could not be produced (say its text would not decode):
                # only that request fails; an escaping error would kill the thread and every request.
                log.exception("request %s failed while emitting its token", sequence.request.request_id)
                broken.add(sequence.request.request_id)
        if broken:
            self._remove_running(broken, counter="requests_failed", error=GenerationFailedError("generation failed"))
        for sequence in self.batch.drop_finished():
            running = self._running.pop(sequence.request.request_id, None)
            if running is not None:
                self._count_finished(len(sequence.token_ids), running.request)
        with self._lock:
            self.stats.running = len(self._running)
            self.stats.steps_total += 1
            self.scheduler.note_step()
            self.stats.last_step_unix = time.time()

    def _emit(self, sequence: Sequence) -> None:
        running = self._running.get(sequence.request.request_id)
        if running is None:
            return
        token = sequence.token_ids[-1]
        last = sequence.is_finished
        request = running.request
        running.sink(
            TokenEvent(
                request_id=request.request_id,
                index=len(sequence.token_ids),
                token_id=token,
                text=sequence.last_text,
                logprob=sequence.logprobs[-1],
                special=token in self.special_ids,
                finish_reason=sequence.finish_reason,
                generated_text=sequence.result(self.generator.tokenizer).text if last else None,
                seed=sequence.chooser.seed,
                num_input_tokens=len(request.input_ids) + len(request.pair_ids),
                num_virtual_tokens=request.prompt.encoder_tokens if request.prompt else 0,
                experts=dict(sequence.experts) if last else {},
                queue_seconds=running.admitted - running.arrival,
            )
        )

    def _record(self, phase: str, prompts: Seq[SoftPrompt | None], seconds: float, *, tokens: int) -> None:
        """Tell the step listeners about a step of `len(prompts)` rows with these soft prompts."""
        # The server resolves a prompt id to one shared SoftPrompt object, so identity counts prompts;
        # rows without a prompt count as one more group.
        record = StepRecord(
            phase="encode" if phase == "encode" else "decode",
            batch_size=len(prompts),
            num_tokens=tokens,
            distinct_prompts=len({id(p) for p in prompts}),
            seconds=seconds,
        )
        for listener in self.step_listeners:
            try:
                listener(record)
            except Exception:  # metrics must never stop the engine
                log.exception("step listener failed")

    def _fail_everything(self, error: Exception) -> None:
        with self._lock:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
            sinks = [self._sinks.pop(w.request.request_id, (None, 0.0))[0] for w in waiting]
        for sink in sinks:
            if sink is not None:
                sink(error)
        for running in self._running.values():
            running.sink(error)
        self._running.clear()
        self.batch = None
        self._admission = None
