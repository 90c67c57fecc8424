"""End to end: `python -m server` as a real process on loopback, driven with httpx."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from server_process import server_process

from engine.prompts import SoftPrompt


@pytest.fixture
def server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with server_process(tiny_model_dir, tmp_path, env={"CPM2_SHUTDOWN_TIMEOUT": "20"}) as running:
        yield running


def test_serve_generate_upload_use_and_drain(server: tuple[subprocess.Popen[bytes], str]) -> None:
    process, url = server
    with httpx.Client(base_url=url, timeout=60) as client:
        first = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 5}})
        assert first.status_code == 200
        assert "generated_text" in first.json()
        prompt = SoftPrompt(prefix=torch.randn(3, 64)).to_bytes()
        upload = client.post("/prompts", files={"file": ("p.safetensors", prompt)}, data={"id": "e2e"})
        assert upload.status_code == 201
        body = {"inputs": "hello", "parameters": {"prompt_id": "e2e", "max_new_tokens": 5, "details": True}}
        with_prompt = client.post("/generate", json=body)
        assert with_prompt.status_code == 200
        assert with_prompt.json()["details"]["virtual_tokens"] == 3
        completion = client.post("/v1/completions", json={"model": "e2e", "prompt": "hello", "max_tokens": 3})
        assert completion.status_code == 200
        assert "cpm2_requests_total" in client.get("/metrics").text
        # Drain under load: a long request finishes, new requests get 503, the process exits.
        with client.stream(
            "POST",
            "/generate_stream",
            json={"inputs": "x", "parameters": {"max_new_tokens": 300, "ignore_eos": True}},
        ) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            assert client.get("/ready").status_code == 503
            refused = client.post("/generate", json={"inputs": "late"})
            assert refused.status_code == 503
            rest = [line for line in lines if line.startswith("data:")]
        assert '"finish_reason":"length"' in rest[-1].replace(" ", "")
        # Nothing lost: every token arrived, and they add up to the final text.
        events = [json.loads(line[5:]) for line in [first, *rest]]
        assert [e["index"] for e in events] == list(range(1, 301))
        assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 20  # within CPM2_SHUTDOWN_TIMEOUT
