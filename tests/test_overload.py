"""A real server at 4x its capacity refuses the excess with 429 and completes what it admits; a dropped
stream is cancelled and stops stepping. Functional checks only: timings are `bench/overload.py`'s."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import server_process

from bench.overload import disconnect_probe, load, metric, references

LIMITS = {"CPM2_MAX_BATCH_SIZE": "4", "CPM2_MAX_QUEUE_REQUESTS": "4"}
CAPACITY = 8
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with server_process(tiny_model_dir, tmp_path_factory.mktemp("overload"), env=LIMITS) as running:
        yield running


def test_overload_refuses_excess_and_completes_admitted(server: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = server
    expected = asyncio.run(references(url, NEW_TOKENS))
    record = asyncio.run(load(url, clients=4 * CAPACITY, seconds=4.0, new_tokens=NEW_TOKENS, expected=expected))
    # Every 429 carried Retry-After and {"error", "error_type": "overloaded"}; every 200 had the text
    # the same input gets alone; nothing else came back (no 5xx, no error events in streams).
    assert record.problems == []
    assert set(record.status_counts) == {200, 429}
    assert record.status_counts[429] > 0
    assert record.status_counts[200] >= CAPACITY
    with httpx.Client(base_url=url) as client:
        text = client.get("/metrics").text
        assert metric(text, "cpm2_requests_running") == 0
        assert metric(text, "cpm2_requests_waiting") == 0
        assert client.get("/health").status_code == 200


def test_dropped_stream_is_cancelled_and_stops_stepping(server: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = server
    probe = disconnect_probe(url, new_tokens=400, read_events=5)
    assert probe["cancelled"] == 1
    assert probe["running_after"] == 0
    assert probe["steps_after_cancel"] == 0
    # It stopped long before its 400 tokens (how soon after the drop is the benchmark's number).
    assert probe["steps_run"] < 400
