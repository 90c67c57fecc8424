"""Fuzz every route of the server's own OpenAPI document with schemathesis, on a real tiny engine.

Schemathesis turns `app.openapi()` into hypothesis strategies of requests: valid ones (positive
mode) and ones that break the schema (negative mode). Each case is sent in-process to the ASGI app
(schemathesis' ASGI client, whose lifespan starts the engine once) and must get an answer that is
not a server error, with every 4xx body in the documented error shape. A second test posts random
bytes and ids to the multipart `/prompts` upload and checks the store is left as it was.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

from engine.prompts import SoftPrompt
from engine.serving.engine import AsyncEngine, EngineConfig
from server.app import create_app
from server.errors import LIBRETRANSLATE_ROUTES
from server.settings import Settings

#: Generated cases the fuzz test must send in total (both modes, every operation).
MIN_CASES = 1000
#: Headroom over MIN_CASES when sizing each run: some runs end early (hypothesis stops once a small
#: input space is exhausted, and a string path parameter has no invalid value to generate).
CASE_HEADROOM = 1.25
MAX_NEW_TOKENS = 4
MAX_TOTAL_TOKENS = 64
ADMIN_TOKEN = "fuzz-admin-token"
#: A prompt uploaded before fuzzing; random ids never collide with it, so it must survive unchanged.
KNOWN_PROMPT = "fuzz-known-prompt"

FUZZ_SETTINGS = settings(
    derandomize=True,  # the same cases on every run: a failure here reproduces
    database=None,
    deadline=None,  # a generation on a shared 2-core machine has no stable latency
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@dataclass
class Tally:
    """What the fuzz run sent and got back, for the assertions at the end."""

    num_cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    no_negative_cases: list[str] = field(default_factory=list)


def _settings(store: Path) -> Settings:
    # Small limits keep every generation a few steps long; upload bytes are capped so a fuzzed
    # multipart body exercises the 413 path cheaply.
    return Settings(
        prompt_store=store,
        max_new_tokens=MAX_NEW_TOKENS,
        max_input_tokens=48,
        max_total_tokens=MAX_TOTAL_TOKENS,
        max_prompt_upload_bytes=64 * 1024,
        payload_limit=64 * 1024,
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture
def fuzz_client(tiny_model_dir: Path, tmp_path: Path) -> Iterator[asgi.ASGIClient]:
    """Schemathesis' in-process client for an app on the tiny engine; its lifespan runs the engine.

    One app per test: schemathesis' pytest plugin ends every ASGI lifespan when a test ends, and an
    engine cannot be started twice.
    """
    engine = AsyncEngine.from_config(EngineConfig(model=tiny_model_dir, max_batch_size=4, max_queue=16))
    app = create_app(_settings(tmp_path / "store"), engine)
    with asgi.get_client(app) as client:
        # Every request carries the admin token, so fuzzed uploads reach the upload code.
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        torch.manual_seed(0)
        files = {"file": ("p.safetensors", SoftPrompt(prefix=torch.randn(2, 64)).to_bytes())}
        created = client.post("/prompts", files=files, data={"id": KNOWN_PROMPT})
        assert created.status_code == 201, created.text
        yield client
    # Also when the plugin is disabled (`-p no:schemathesis`): drain the engine and end its thread.
    asgi.shutdown_lifespans()


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def assert_error_shape(path: str, status: int, body: Any) -> None:
    """A 4xx body is `{"error": str, "error_type": str}`; OpenAI routes use OpenAI's envelope,
    LibreTranslate's routes its `{"error": str}`."""
    if path in LIBRETRANSLATE_ROUTES:
        assert set(body) == {"error"}, body
        assert _is_text(body["error"]), body
    elif path.startswith("/v1/"):
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert _is_text(error["message"]), body
        assert _is_text(error["type"]), body
        assert error["code"] == status, body
    else:
        assert set(body) == {"error", "error_type"}, body
        assert _is_text(body["error"]), body
        assert _is_text(body["error_type"]), body


def _sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append(json.loads(line[5:]))
    return events


def check_response(path: str, status: int, content_type: str, body: bytes) -> None:
    """Not a server error; errors in the documented shape; error events in a stream not internal."""
    # 504 is the documented answer to a request past its own `timeout_ms`; anything else >= 500 is a bug.
    assert status < 500 or status == 504, (status, body[:500])
    if status >= 400:
        assert content_type.startswith("application/json"), content_type
        assert_error_shape(path, status, json.loads(body))
    elif content_type.startswith("text/event-stream"):
        # After the 200 is sent, errors travel as events; a client error may appear there, a crash not.
        for event in _sse_events(body.decode()):
            if "error" in event:
                error = event["error"]
                error_type = error["type"] if isinstance(error, dict) else event["error_type"]
                assert error_type not in ("internal", "generation"), event


def _operations(schema: Any) -> list[Any]:
    operations = []
    for result in schema.get_all_operations():
        operations.append(result.ok())  # raises if schemathesis cannot read an operation of ours
    return operations


def _has_inputs(operation: Any) -> bool:
    return any(len(group.items) > 0 for group in (operation.body, operation.path_parameters, operation.query))


def test_fuzz_every_route(fuzz_client: asgi.ASGIClient) -> None:
    app = fuzz_client.app
    schema = schemathesis.openapi.from_dict(app.openapi())  # type: ignore[attr-defined]
    operations = _operations(schema)
    labels = {op.label for op in operations}
    # Every route the README lists is in the document (and so fuzzed).
    for label in ("POST /generate", "POST /generate_stream", "POST /", "POST /v1/completions", "POST /prompts"):
        assert label in labels, labels
    tally = Tally()
    started = time.monotonic()
    # Operations without inputs have one request to send; the rest share the case budget, each in
    # positive (valid) and negative (schema-breaking) mode.
    num_input_runs = 2 * sum(_has_inputs(op) for op in operations)
    per_run = math.ceil(CASE_HEADROOM * MIN_CASES / num_input_runs)

    for operation in operations:
        modes = (
            [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if _has_inputs(operation) else [GenerationMode.POSITIVE]
        )
        for mode in modes:

            @settings(FUZZ_SETTINGS, max_examples=per_run if _has_inputs(operation) else 1)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call(session=fuzz_client)
                tally.num_cases += 1
                tally.statuses[response.status_code] += 1
                tally.per_operation[case.operation.label] += 1
                content_type = response.headers.get("content-type", [""])[0]
                check_response(case.formatted_path, response.status_code, content_type, response.content)
                # Errors too: the document declares the error bodies the server really sends.
                checks = [not_a_server_error, response_schema_conformance]
                if response.status_code != 504:
                    case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:
                # Some operations have no invalid input to generate (a string path parameter
                # accepts any string); schemathesis then rejects every draw.
                assert mode is GenerationMode.NEGATIVE, operation.label
                tally.no_negative_cases.append(operation.label)

    elapsed = time.monotonic() - started
    print(f"fuzz: {tally.num_cases} cases in {elapsed:.1f}s; statuses {dict(tally.statuses)}")
    print(f"fuzz: per operation {dict(tally.per_operation)}; no negative cases for {tally.no_negative_cases}")
    assert tally.num_cases >= MIN_CASES, tally.per_operation
    assert set(tally.per_operation) == labels
    # Both sides were exercised: valid requests that generated, and invalid ones refused with 422.
    assert tally.statuses[200] > 0
    assert tally.statuses[422] > 0
    assert fuzz_client.get(f"/prompts/{KNOWN_PROMPT}").status_code == 200


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_huge_max_new_tokens_is_422(fuzz_client: asgi.ASGIClient, route: str) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 10**9}}
    r = fuzz_client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert_error_shape(route, 422, r.json())
    assert f"max_total_tokens ({MAX_TOTAL_TOKENS})" in r.json()["error"]


def test_huge_max_tokens_is_422_on_openai(fuzz_client: asgi.ASGIClient) -> None:
    r = fuzz_client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2**62})
    assert r.status_code == 422, r.text
    assert_error_shape("/v1/completions", 422, r.json())


def test_default_max_new_tokens_is_the_setting(fuzz_client: asgi.ASGIClient) -> None:
    body = {"inputs": "hello", "parameters": {"ignore_eos": True, "details": True}}
    r = fuzz_client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == MAX_NEW_TOKENS


def _stored(client: asgi.ASGIClient) -> list[dict[str, Any]]:
    r = client.get("/prompts")
    assert r.status_code == 200
    return sorted(r.json()["data"], key=lambda record: record["id"])


# Ids from the valid alphabet (so some reach the file checks) and from anywhere (so some are refused).
_ids = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True), st.text(max_size=40))
_files = st.one_of(
    st.binary(max_size=2048),
    # A plausible safetensors header length followed by junk reaches the header parser.
    st.builds(lambda n, rest: n.to_bytes(8, "little") + rest, st.integers(0, 2**64 - 1), st.binary(max_size=512)),
)


def test_fuzz_prompt_upload_with_random_bytes(fuzz_client: asgi.ASGIClient) -> None:
    before = _stored(fuzz_client)
    statuses: Counter[int] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=150)
    @given(prompt_id=_ids, data=_files, description=st.text(max_size=30), with_config=st.booleans())
    def upload(prompt_id: str, data: bytes, description: str, with_config: bool) -> None:
        files: dict[str, tuple[str, bytes]] = {"file": ("p.safetensors", data)}
        if with_config:
            files["adapter_config"] = ("adapter_config.json", data[:64])
        r = fuzz_client.post("/prompts", files=files, data={"id": prompt_id, "description": description})
        statuses[r.status_code] += 1
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert_error_shape("/prompts", r.status_code, r.json())

    upload()
    assert _stored(fuzz_client) == before
    # Not only the id check answered: the file checks ran too (415 not safetensors, 422 bad config).
    assert statuses[415] > 0, statuses


# Found by the fuzz test: logits divided by a tiny temperature or penalty overflowed float32 and
# the request failed mid-generation with a 500; the server now refuses it up front.
@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", {"inputs": "hi", "parameters": {"do_sample": True, "temperature": 1e-40}}),
        ("/generate_stream", {"inputs": "hi", "parameters": {"temperature": 5e-324}}),
        ("/generate", {"inputs": "hi hi hi", "parameters": {"do_sample": True, "repetition_penalty": 1e-40}}),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 1e-40}),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "repetition_penalty": 5e-324}),
    ],
)
def test_tiny_temperature_or_penalty_is_422(fuzz_client: asgi.ASGIClient, route: str, body: dict[str, Any]) -> None:
    r = fuzz_client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert_error_shape(route, 422, r.json())
    assert "at least 0.0001" in r.text


def test_small_but_sane_temperature_still_samples(fuzz_client: asgi.ASGIClient) -> None:
    body = {"inputs": "hi", "parameters": {"do_sample": True, "temperature": 1e-3, "repetition_penalty": 1e-3}}
    r = fuzz_client.post("/generate", json=body)
    assert r.status_code == 200, r.text
