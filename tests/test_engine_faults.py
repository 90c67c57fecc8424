"""Faults inside the engine stay contained: one bad request fails alone, a stuck step shows on /health,
a damaged checkpoint fails at start-up naming its file, and the expert pool stays within its budget.

Runs the real tiny engine in-process (faults are injected by monkeypatching the generator) and, for
corrupt checkpoints, a real `python -m server` process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_process import free_port

from engine.generation.generator import Sequence
from engine.offload import OffloadConfig
from engine.serving.engine import AsyncEngine, EngineConfig
from engine.serving.scheduler import Scheduler
from server.app import create_app
from server.settings import Settings

POISON = "POISON pill"
GOOD = [f"question {i}: 12 + {i} =" for i in range(4)]


def _client(model_dir: Path, store: Path, **engine_options: object) -> TestClient:
    config = EngineConfig(model=model_dir, max_batch_size=8, max_queue=64, **engine_options)  # type: ignore[arg-type]
    return TestClient(create_app(Settings(prompt_store=store), AsyncEngine.from_config(config)))


def _body(text: str) -> dict[str, object]:
    return {"inputs": text, "parameters": {"max_new_tokens": 8, "ignore_eos": True}}


@pytest.fixture
def client(tiny_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with _client(tiny_model_dir, tmp_path / "store") as test_client:
        yield test_client


def _hold_admission_until(monkeypatch: pytest.MonkeyPatch, engine: AsyncEngine, count: int) -> None:
    """Make the scheduler admit nothing until `count` requests wait, so they share one batch (once)."""
    original = Scheduler.admit
    is_held = [True]

    def admit(self: Scheduler, *, num_running: int) -> list:  # type: ignore[type-arg]
        if is_held[0] and len(self.waiting) < count:
            return []
        is_held[0] = False
        return original(self, num_running=num_running)

    monkeypatch.setattr(engine.loop.scheduler, "admit", admit.__get__(engine.loop.scheduler))


def _run_batch_with_poison(client: TestClient) -> tuple[list[dict], object]:
    with ThreadPoolExecutor(len(GOOD) + 1) as pool:
        good = [pool.submit(client.post, "/generate", json=_body(text)) for text in GOOD]
        bad = pool.submit(client.post, "/generate", json=_body(POISON))
        responses = [f.result(timeout=60) for f in good]
        poisoned = bad.result(timeout=60)
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses], poisoned


def _assert_failed_alone(poisoned: object, engine: AsyncEngine, failed_before: int) -> None:
    assert poisoned.status_code == 500
    assert poisoned.json()["error_type"] == "generation"
    assert engine.stats().requests_failed == failed_before + 1
    assert engine.health().status == "ok"


def test_failure_while_encoding_one_request_fails_only_it(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine: AsyncEngine = client.app.state.ctx.engine  # type: ignore[attr-defined]
    alone = [client.post("/generate", json=_body(text)).json()["generated_text"] for text in GOOD]
    poison_ids = tuple(engine.tokenize(POISON))
    original = engine.generator.begin_prefill
    batch_sizes: list[int] = []

    def begin_prefill(requests):  # type: ignore[no-untyped-def]
        batch_sizes.append(len(requests))
        if any(tuple(r.input_ids) == poison_ids for r in requests):
            raise RuntimeError("injected: this request cannot be encoded")
        return original(requests)

    # Every encoder pass starts here, batched or of one request alone.
    monkeypatch.setattr(engine.generator, "begin_prefill", begin_prefill)
    _hold_admission_until(monkeypatch, engine, len(GOOD) + 1)
    failed_before = engine.stats().requests_failed
    together, poisoned = _run_batch_with_poison(client)
    # One batch of five failed, then each was encoded alone; only the poisoned one failed.
    assert batch_sizes[0] == len(GOOD) + 1
    assert [r["generated_text"] for r in together] == alone
    _assert_failed_alone(poisoned, engine, failed_before)


def test_failure_while_finishing_one_request_fails_only_it(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine: AsyncEngine = client.app.state.ctx.engine  # type: ignore[attr-defined]
    alone = [client.post("/generate", json=_body(text)).json()["generated_text"] for text in GOOD]
    poison_ids = tuple(engine.tokenize(POISON))
    original = Sequence.result

    def result(self: Sequence, tokenizer):  # type: ignore[no-untyped-def]
        if tuple(self.request.input_ids) == poison_ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected: the output does not decode")
        return original(self, tokenizer)

    monkeypatch.setattr(Sequence, "result", result)
    _hold_admission_until(monkeypatch, engine, len(GOOD) + 1)
    failed_before = engine.stats().requests_failed
    together, poisoned = _run_batch_with_poison(client)
    assert [r["generated_text"] for r in together] == alone
    _assert_failed_alone(poisoned, engine, failed_before)
    # The engine thread survived: later requests are served.
    assert client.post("/generate", json=_body(GOOD[0])).json()["generated_text"] == alone[0]


def test_stuck_step_makes_health_fail_then_recover(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(tiny_model_dir, tmp_path / "store", stall_seconds=1.5) as client:
        engine: AsyncEngine = client.app.state.ctx.engine  # type: ignore[attr-defined]
        assert client.get("/health").status_code == 200
        release = threading.Event()
        original = engine.generator.step

        def step(batch):  # type: ignore[no-untyped-def]
            release.wait(timeout=30)  # a hung kernel or a dead-locked transfer
            return original(batch)

        monkeypatch.setattr(engine.generator, "step", step)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, "/generate", json=_body(GOOD[0]))
            deadline = time.monotonic() + 20
            health = client.get("/health")
            while health.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
                health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "stalled"
            assert health.json()["last_step_age_seconds"] > 1.5
            release.set()
            assert pending.result(timeout=30).status_code == 200
        assert client.get("/health").status_code == 200


def _damaged_copy(model_dir: Path, tmp_path: Path, relative: str) -> tuple[Path, Path]:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    target = copy / relative
    with target.open("r+b") as f:
        f.truncate(target.stat().st_size * 2 // 3)
    return copy, target


@pytest.mark.parametrize(
    ("relative", "flags"),
    [
        ("model.safetensors", []),
        ("experts/decoder-001.safetensors", []),
        # Offloaded: the store is read lazily while serving, so it must be checked at open.
        ("experts/encoder-000.safetensors", ["--expert-memory", "25%"]),
    ],
)
def test_truncated_checkpoint_fails_at_start_naming_the_file(
    tiny_model_dir: Path, tmp_path: Path, relative: str, flags: list[str]
) -> None:
    model, damaged = _damaged_copy(tiny_model_dir, tmp_path, relative)
    args = ["--model", str(model), "--port", str(free_port()), "--prompt-store", str(tmp_path / "p"), *flags]
    done = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"CheckpointError: {damaged}" in done.stdout + done.stderr


def _gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    assert match is not None, f"{name} is not exported"
    return float(match.group(1))


def test_expert_pool_stays_within_its_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    offload = OffloadConfig(expert_memory="25%", direct_io=True)  # direct: every expert goes through the pool
    with _client(tiny_model_dir, tmp_path / "store", offload=offload) as client:
        bodies = [
            {
                "inputs": f"{i} 北京 {i * 7} the quick brown fox",
                "parameters": {"max_new_tokens": 16, "ignore_eos": True},
            }
            for i in range(16)
        ]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda body: client.post("/generate", json=body), bodies))
        assert all(r.status_code == 200 for r in responses)
        metrics = client.get("/metrics").text
    budget = _gauge(metrics, "cpm2_expert_memory_bytes")
    used = _gauge(metrics, "cpm2_expert_pool_used_bytes")
    assert _gauge(metrics, "cpm2_expert_cache_misses_total") > 0  # experts really moved through the pool
    assert 0 < used <= budget
    # Expert bytes in RAM now: the pool (allocated up front, within the budget) plus whatever of the
    # mapped store the page cache holds.
    pool_bytes = _gauge(metrics, "cpm2_expert_resident_bytes") - _gauge(metrics, "cpm2_expert_mapped_resident_bytes")
    assert used <= pool_bytes <= budget
    # Per MoE layer: the counters add up to the totals, and each layer's prediction is scored.
    for total, per_layer in (
        ("cpm2_expert_cache_misses_total", "cpm2_expert_layer_misses_total"),
        ("cpm2_expert_cache_hits_total", "cpm2_expert_layer_hits_total"),
        ("cpm2_expert_predicted_total", "cpm2_expert_layer_predicted_total"),
        ("cpm2_expert_predicted_used_total", "cpm2_expert_layer_predicted_used_total"),
    ):
        layers = _labelled(metrics, per_layer)
        assert set(layers) == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}
        assert sum(layers.values()) == _gauge(metrics, total)
    predicted = _labelled(metrics, "cpm2_expert_layer_predicted_total")
    used_ = _labelled(metrics, "cpm2_expert_layer_predicted_used_total")
    needed = _labelled(metrics, "cpm2_expert_layer_needed_after_prediction_total")
    assert predicted["decoder.1"] > 0
    assert predicted["decoder.0"] > 0  # the first MoE layer of a stack, from the stack's input
    assert all(used_[layer] <= min(predicted[layer], needed[layer]) for layer in predicted)


def _labelled(metrics: str, name: str) -> dict[str, float]:
    """A per-layer counter's values by layer label."""
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}{{layer="([^"]+)"}} (\S+)$', metrics, re.MULTILINE)}


def test_page_cache_mode_shows_the_expert_memory_the_budget_does_not_bound(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Page-cache mode computes experts the kernel holds in place from the mapped store: their pages
    count as resident expert memory beside the pool, reported by /metrics and /info (issue: budgets
    that hold; until they do, the excess is visible)."""
    store = tmp_path / "experts-store"
    offload = OffloadConfig(expert_memory="25%", store_dir=store, direct_io=False)  # page-cache mode, asked for
    with _client(tiny_model_dir, tmp_path / "store", offload=offload) as client:
        for path in (store / "experts").glob("*.safetensors"):
            path.read_bytes()  # the page cache holds every expert now
        body = {"inputs": "北京 the quick brown fox", "parameters": {"max_new_tokens": 8, "ignore_eos": True}}
        assert client.post("/generate", json=body).status_code == 200
        metrics = client.get("/metrics").text
        info = client.get("/info").json()
    assert _gauge(metrics, "cpm2_expert_in_place_total") > 0
    mapped = _gauge(metrics, "cpm2_expert_mapped_resident_bytes")
    budget = _gauge(metrics, "cpm2_expert_memory_bytes")
    assert mapped > budget  # every expert in RAM through the page cache: the budget does not hold
    assert _gauge(metrics, "cpm2_expert_resident_bytes") >= mapped
    memory = info["expert_memory"]
    assert memory["budget_bytes"] == budget
    assert memory["resident_bytes"] == memory["pool_bytes"] + memory["mapped_resident_bytes"]
    assert memory["pool_bytes"] <= budget < memory["mapped_resident_bytes"]


def test_the_engine_thread_steps_in_inference_mode(client: TestClient) -> None:
    """Encoding and decode steps run under `torch.inference_mode` (no autograd bookkeeping)."""
    import torch

    engine: AsyncEngine = client.app.state.ctx.engine  # type: ignore[attr-defined]
    modes: list[bool] = []
    engine.add_step_listener(lambda record: modes.append(torch.is_inference_mode_enabled()))
    r = client.post("/generate", json=_body(GOOD[0]))
    assert r.status_code == 200, r.text
    assert modes
    assert all(modes)
