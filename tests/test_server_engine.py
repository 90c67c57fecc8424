"""The server on a real tiny engine: batching equals one-by-one with mixed prompts, streaming,
shared prompt stores, cancellation on disconnect, deadlines, offloaded-expert details."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from server_fakes import local_client

from engine.offload import OffloadConfig
from engine.prompts import SoftPrompt
from engine.serving.engine import AsyncEngine, EngineConfig
from server.app import create_app
from server.settings import Settings


def _app(model_dir: Path, store: Path, **engine_options: object):  # type: ignore[no-untyped-def]
    config = EngineConfig(model=model_dir, max_batch_size=8, max_queue=64, **engine_options)  # type: ignore[arg-type]
    settings = Settings(prompt_store=store, max_input_tokens=256, max_total_tokens=512, allow_local_admin=True)
    return create_app(settings, AsyncEngine.from_config(config))


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with local_client(_app(tiny_model_dir, tmp_path_factory.mktemp("store"))) as test_client:
        yield test_client


def _upload(client: TestClient, prompt_id: str, prompt: SoftPrompt) -> None:
    files = {"file": ("p.safetensors", prompt.to_bytes(), "application/octet-stream")}
    r = client.post("/prompts", files=files, data={"id": prompt_id})
    assert r.status_code == 201, r.text


def _generate(client: TestClient, body: dict) -> dict:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_mixed_prompts_equal_one_by_one(client: TestClient) -> None:
    torch.manual_seed(0)
    _upload(client, "front", SoftPrompt(prefix=torch.randn(4, 64) * 0.5))
    _upload(client, "middle", SoftPrompt(infix=torch.randn(3, 64) * 0.5, suffix=torch.randn(2, 64) * 0.5))
    _upload(client, "dec", SoftPrompt(decoder_prefix=torch.randn(2, 64) * 0.5))
    bodies = []
    for i in range(12):
        parameters: dict[str, object] = {"max_new_tokens": 12, "details": True, "ignore_eos": True}
        if i % 4:
            parameters["prompt_id"] = ["front", "middle", "dec"][i % 4 - 1]
        if i % 4 == 2:
            parameters["text_pair"] = "四千零九十六"
        if i % 3 == 0:
            parameters.update(do_sample=True, seed=i, temperature=0.8)
        bodies.append({"inputs": f"question {i}: 37 + {i} =", "parameters": parameters})
    alone = [_generate(client, body) for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: _generate(client, body), bodies))
    # Same tokens; logprobs agree to float32 rounding (a batch's GEMMs sum in another order).
    for one, batched in zip(alone, together, strict=True):
        ids = [(t["id"], t["text"]) for t in one["details"]["tokens"]]
        assert [(t["id"], t["text"]) for t in batched["details"]["tokens"]] == ids
        logprobs = [t["logprob"] for t in one["details"]["tokens"]]
        assert [t["logprob"] for t in batched["details"]["tokens"]] == pytest.approx(logprobs, abs=1e-4)
    assert [r["generated_text"] for r in together] == [r["generated_text"] for r in alone]
    assert len({r["generated_text"] for r in alone}) > 3
    assert together[2]["details"]["virtual_tokens"] == 5
    metrics = client.get("/metrics").text
    distinct = [line for line in metrics.splitlines() if line.startswith("cpm2_batch_distinct_prompts_sum")]
    assert float(distinct[0].split()[-1]) > 0


def test_stream_text_adds_up(client: TestClient) -> None:
    body = {"inputs": "hello there", "parameters": {"max_new_tokens": 10, "ignore_eos": True}}
    r = client.post("/generate_stream", json=body)
    events = [line for line in r.text.splitlines() if line.startswith("data:")]
    import json

    parsed = [json.loads(e[5:]) for e in events]
    assert len(parsed) == 10
    assert "".join(p["token"]["text"] for p in parsed) == parsed[-1]["generated_text"]
    assert parsed[-1]["generated_text"] == _generate(client, body)["generated_text"]


def test_two_servers_share_one_prompt_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "shared"
    with local_client(_app(tiny_model_dir, store)) as a, local_client(_app(tiny_model_dir, store)) as b:
        _upload(a, "shared-task", SoftPrompt(prefix=torch.randn(2, 64)))
        assert [p["id"] for p in b.get("/prompts").json()["data"]] == ["shared-task"]
        body = {"inputs": "x", "parameters": {"prompt_id": "shared-task", "max_new_tokens": 3}}
        assert _generate(b, body)["generated_text"] == _generate(a, body)["generated_text"]
        assert a.delete("/prompts/shared-task").status_code == 204
        assert b.post("/generate", json=body).status_code == 404
        _upload(b, "shared-task", SoftPrompt(prefix=torch.randn(3, 64)))
        r = a.post("/generate", json={**body, "parameters": {**body["parameters"], "details": True}})
        assert r.json()["details"]["virtual_tokens"] == 3


def test_disconnect_cancels_the_request(client: TestClient) -> None:
    engine = client.app.state.ctx.engine  # type: ignore[attr-defined]
    before = engine.stats().requests_cancelled
    body = {"inputs": "a long one", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    with client.stream("POST", "/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 10
    while engine.stats().requests_cancelled == before and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats()
    assert stats.requests_cancelled == before + 1
    assert stats.running == 0


def test_deadline(client: TestClient) -> None:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 400, "ignore_eos": True, "timeout_ms": 50}}
    r = client.post("/generate", json=body)
    assert r.status_code == 504
    assert r.json()["error_type"] == "timeout"


def test_offloaded_engine_reports_expert_traffic(tiny_model_dir: Path, tmp_path: Path) -> None:
    offload = OffloadConfig(expert_memory="40%", direct_io=True)
    with local_client(_app(tiny_model_dir, tmp_path / "s", offload=offload)) as client:
        details = _generate(client, {"inputs": "hi", "parameters": {"max_new_tokens": 5, "details": True}})["details"]
        assert details["experts"]["misses"] > 0
        assert details["experts"]["bytes_moved"] > 0
        assert client.get("/info").json()["experts_offloaded"] is True
        assert "cpm2_expert_bytes_moved_total" in client.get("/metrics").text
