"""The scheduler: bounded FIFO admission, cancellation and deadlines (plain Python, no tensors)."""

from __future__ import annotations

import pytest

from engine.generation import SamplingParams
from engine.serving.protocol import EngineOverloadedError, EngineRequest
from engine.serving.scheduler import Scheduler


def _request(i: int, deadline: float | None = None) -> EngineRequest:
    return EngineRequest(request_id=f"r{i}", input_ids=(5, 1), params=SamplingParams(), deadline=deadline)


def test_admits_oldest_first_up_to_the_batch_room() -> None:
    scheduler = Scheduler(max_running=3, max_waiting=10)
    for i in range(5):
        scheduler.submit(_request(i), now=float(i))
    first = scheduler.admit(num_running=1)
    assert [w.request.request_id for w in first] == ["r0", "r1"]
    assert [w.arrival for w in first] == [0.0, 1.0]
    assert scheduler.admit(num_running=3) == []
    assert [w.request.request_id for w in scheduler.admit(num_running=0)] == ["r2", "r3", "r4"]


def test_full_queue_refuses_at_once() -> None:
    scheduler = Scheduler(max_running=1, max_waiting=2)
    scheduler.submit(_request(0), now=0)
    scheduler.submit(_request(1), now=0)
    with pytest.raises(EngineOverloadedError, match="queue is full") as excinfo:
        scheduler.submit(_request(2), now=0)
    assert excinfo.value.retry_after > 0
    assert len(scheduler.waiting) == 2


def test_cancel_and_expiry_remove_waiting_requests() -> None:
    scheduler = Scheduler(max_running=1, max_waiting=5)
    scheduler.submit(_request(0, deadline=5.0), now=0)
    scheduler.submit(_request(1), now=0)
    scheduler.submit(_request(2, deadline=50.0), now=0)
    assert scheduler.cancel("r1")
    assert not scheduler.cancel("r1")
    assert [w.request.request_id for w in scheduler.expired(now=10.0)] == ["r0"]
    assert [w.request.request_id for w in scheduler.waiting] == ["r2"]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_running"):
        Scheduler(max_running=0, max_waiting=1)
    with pytest.raises(ValueError, match="waiting_served_ratio"):
        Scheduler(max_running=1, max_waiting=1, waiting_served_ratio=-1)


def _ids(admitted: list) -> list[str]:  # type: ignore[type-arg]
    return [w.request.request_id for w in admitted]


def test_waiting_requests_are_encoded_together() -> None:
    """With a ratio, new requests wait until enough of them are queued, or long enough."""
    scheduler = Scheduler(max_running=16, max_waiting=32, waiting_served_ratio=0.25, max_waiting_steps=3)
    scheduler.submit(_request(0), now=0)
    assert _ids(scheduler.admit(num_running=0)) == ["r0"]  # an idle engine never waits
    scheduler.submit(_request(1), now=0)
    assert scheduler.admit(num_running=8) == []  # 1 < 0.25 x 8
    scheduler.submit(_request(2), now=0)
    assert _ids(scheduler.admit(num_running=8)) == ["r1", "r2"]  # 2 >= 0.25 x 8
    scheduler.submit(_request(3), now=0)
    for _ in range(3):
        assert scheduler.admit(num_running=8) == []
        scheduler.note_step()
    assert _ids(scheduler.admit(num_running=8)) == ["r3"]  # waited max_waiting_steps
    scheduler.submit(_request(4), now=0)
    assert _ids(scheduler.admit(num_running=15)) == ["r4"]  # it fills the free room


def test_ratio_zero_admits_at_every_step() -> None:
    scheduler = Scheduler(max_running=16, max_waiting=32)
    scheduler.submit(_request(0), now=0)
    assert _ids(scheduler.admit(num_running=15 - 1)) == ["r0"]


def test_one_admission_encodes_at_most_the_prefill_budget() -> None:
    """A burst is admitted in chunks of at most `max_prefill_tokens` encoder tokens (input, pair and
    virtual), oldest first; a request larger than the budget still runs, alone."""
    import torch

    from engine.prompts import SoftPrompt

    scheduler = Scheduler(max_running=64, max_waiting=64, max_prefill_tokens=10)
    prompt = SoftPrompt(prefix=torch.zeros(4, 8))
    sizes = [(3, None), (3, None), (2, prompt), (12, None), (1, None)]  # 3, 3, 6, 12, 1 tokens
    for i, (n, p) in enumerate(sizes):
        request = EngineRequest(request_id=f"r{i}", input_ids=(5,) * n, params=SamplingParams(), prompt=p)
        scheduler.submit(request, now=float(i))
    assert _ids(scheduler.admit(num_running=0)) == ["r0", "r1"]  # 3 + 3; r2's 6 would make 12
    assert _ids(scheduler.admit(num_running=2)) == ["r2"]  # 6; r3's 12 would exceed
    assert _ids(scheduler.admit(num_running=3)) == ["r3"]  # over the budget alone: admitted alone
    assert _ids(scheduler.admit(num_running=4)) == ["r4"]
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Scheduler(max_running=1, max_waiting=1, max_prefill_tokens=-1)
    unlimited = Scheduler(max_running=64, max_waiting=64)  # the default: no limit
    for i in range(5):
        unlimited.submit(EngineRequest(request_id=f"u{i}", input_ids=(5,) * 500, params=SamplingParams()), now=0.0)
    assert len(unlimited.admit(num_running=0)) == 5
