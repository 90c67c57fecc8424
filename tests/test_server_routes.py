"""Every HTTP route against a fake engine: schemas, SSE framing, errors, auth, prompts, metrics."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from server_fakes import D_MODEL, FakeEngine, local_client

from engine.errors import ConfigError, InputError
from engine.prompts import SoftPrompt
from server import schemas
from server.app import create_app
from server.settings import Settings


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    # Prompt writes from the (loopback) test client, as `make serve` allows them.
    base = {"prompt_store": tmp_path / "prompts", "max_input_tokens": 64, "max_total_tokens": 96}
    base["allow_local_admin"] = True
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(tmp_path: Path, engine: FakeEngine) -> Iterator[TestClient]:
    with local_client(create_app(_settings(tmp_path), engine)) as test_client:
        yield test_client


def _prompt_bytes(**shapes: int) -> bytes:
    return SoftPrompt(**{k: torch.randn(n, D_MODEL) for k, n in shapes.items()}).to_bytes()


def _upload(client: TestClient, prompt_id: str, data: bytes, **headers: str):  # type: ignore[no-untyped-def]
    files = {"file": ("p.safetensors", data, "application/octet-stream")}
    return client.post("/prompts", files=files, data={"id": prompt_id, "description": "d"}, headers=headers)


def _sse(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]


# ---- generation ------------------------------------------------------------------------------


def test_generate(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200
    assert r.json() == {"generated_text": "abcd"}
    assert r.headers["x-generated-tokens"] == "4"
    assert r.headers["x-prompt-tokens"] == "6"
    assert len(r.headers["x-request-id"]) == 32
    for header in ("x-total-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert int(r.headers[header]) >= 0
    (request,) = engine.requests
    assert request.params.max_new_tokens == 4
    assert not request.params.do_sample


def test_generate_details(client: TestClient) -> None:
    body = {
        "inputs": "hi",
        "parameters": {"max_new_tokens": 3, "details": True, "seed": 7, "do_sample": True},
    }
    details = client.post("/generate", json=body).json()["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 3
    assert details["seed"] == 7
    assert details["input_length"] == 3
    assert details["prefill"] == []
    assert [t["text"] for t in details["tokens"]] == ["a", "b", "c"]
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in details["tokens"])
    assert details["experts"] == {"bytes_moved": 4096.0, "hits": 3.0, "misses": 1.0}


def test_tgi_client_payload_with_nulls_is_accepted(client: TestClient) -> None:
    # What text-generation's Python client sends: every field, null when unset.
    parameters = {
        "best_of": None,
        "decoder_input_details": False,
        "details": True,
        "do_sample": False,
        "frequency_penalty": None,
        "grammar": None,
        "max_new_tokens": 2,
        "repetition_penalty": None,
        "return_full_text": False,
        "seed": None,
        "stop": [],
        "temperature": None,
        "top_k": None,
        "top_n_tokens": None,
        "top_p": None,
        "truncate": None,
        "typical_p": None,
        "watermark": False,
        "adapter_id": None,
    }
    r = client.post("/generate", json={"inputs": "x", "parameters": parameters, "stream": False})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"best_of": 2}, "best_of"),
        ({"watermark": True}, "watermark"),
        ({"top_n_tokens": 3}, "top_n_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop sequences"),
        ({"max_new_tokens": 95}, "max_total_tokens"),
        ({"num_beams": 2, "do_sample": True}, "beam search"),
        ({"mystery": 1}, "mystery"),
    ],
)
def test_invalid_parameters_get_422(client: TestClient, parameters: dict, message: str) -> None:
    r = client.post("/generate", json={"inputs": "hello", "parameters": parameters})
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation"
    assert message in body["error"]


def test_input_length_counts_virtual_tokens(client: TestClient) -> None:
    assert _upload(client, "long", _prompt_bytes(prefix=60)).status_code == 201
    ok = client.post("/generate", json={"inputs": "x" * 10, "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200
    r = client.post("/generate", json={"inputs": "x" * 10, "parameters": {"prompt_id": "long"}})
    assert r.status_code == 422
    assert "60 virtual" in r.json()["error"]
    truncated = {"inputs": "x" * 100, "parameters": {"truncate": 10, "max_new_tokens": 2}}
    assert client.post("/generate", json=truncated).status_code == 200
    assert client.post("/generate", json={"inputs": "x" * 100}).status_code == 422
    assert client.post("/generate", json={"inputs": ""}).status_code == 422


def test_generate_with_a_prompt_and_text_pair(client: TestClient, engine: FakeEngine) -> None:
    assert _upload(client, "pair-task", _prompt_bytes(prefix=2, infix=3)).status_code == 201
    body = {"inputs": "ab", "parameters": {"adapter_id": "pair-task", "text_pair": "cd", "max_new_tokens": 1}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200
    assert r.headers["x-virtual-tokens"] == "5"
    request = engine.requests[-1]
    assert request.prompt_id == "pair-task"
    assert request.prompt is not None
    assert request.prompt.num_virtual_tokens == {"prefix": 2, "infix": 3}
    assert request.input_ids == (ord("a") + 3, ord("b") + 3)  # no EOS before the pair
    assert request.pair_ids[-1] == 1
    missing = client.post("/generate", json={"inputs": "ab", "parameters": {"prompt_id": "nope"}})
    assert missing.status_code == 404
    assert missing.json()["error_type"] == "prompt_not_found"


def test_stream(client: TestClient) -> None:
    r = client.post("/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert [e["token"]["text"] for e in events] == ["a", "b", "c"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == "abc"
    assert events[-1]["details"]["finish_reason"] == "length"
    assert events[-1]["details"]["generated_tokens"] == 3


def test_stream_error_after_start_is_an_event(client: TestClient) -> None:
    r = client.post("/generate_stream", json={"inputs": "fail please", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200
    events = _sse(r.text)
    assert events[0]["token"]["text"] == "a"
    assert events[-1] == {"error": "fake failure in the engine", "error_type": "generation"}


def test_compat_route(client: TestClient) -> None:
    plain = client.post("/", json={"inputs": "hey", "parameters": {"max_new_tokens": 2}})
    assert plain.status_code == 200
    assert plain.json() == [{"generated_text": "ab"}]
    streamed = client.post("/", json={"inputs": "hey", "parameters": {"max_new_tokens": 2}, "stream": True})
    assert [e["token"]["text"] for e in _sse(streamed.text)] == ["a", "b"]


@pytest.mark.parametrize(
    ("inputs", "status", "error_type"),
    [
        ("overload me", 429, "overloaded"),
        ("unavailable", 503, "unavailable"),
        ("fail", 500, "generation"),
        ("deadline", 504, "timeout"),
    ],
)
def test_engine_errors_map_to_status_codes(client: TestClient, inputs: str, status: int, error_type: str) -> None:
    r = client.post("/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == status
    assert r.json()["error_type"] == error_type
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1


# ---- the fields clients require ----------------------------------------------------------------

#: Required fields of each response body, by cpm2 model: TGI's OpenAPI document
#: (huggingface/text-generation-inference `docs/openapi.json`, 3.3.6) for the TGI routes, and for
#: `/v1/completions` TGI's `CompletionFinal`/`Chunk`/`CompletionComplete`/`Usage` joined with OpenAI's
#: completion schema (`logprobs` is required, nullable, in OpenAI's choice).
REQUIRED = {
    "GenerateResponse": {"generated_text"},
    "Details": {"finish_reason", "generated_tokens", "prefill", "tokens"},
    "Token": {"id", "text", "logprob", "special"},
    "PrefillToken": {"id", "text", "logprob"},
    "StreamResponse": {"index", "token"},
    "StreamDetails": {"finish_reason", "generated_tokens", "input_length"},
    "ErrorResponse": {"error", "error_type"},
    "Completion": {"id", "object", "created", "model", "system_fingerprint", "choices"},
    "CompletionChoice": {"index", "text", "logprobs", "finish_reason"},
    "CompletionUsage": {"prompt_tokens", "completion_tokens", "total_tokens"},
    "OpenAIError": {"message", "type", "param", "code"},
}


def _has_required(model: str, body: dict) -> None:
    missing = REQUIRED[model] - set(body)
    assert not missing, f"{model} lacks {missing}: {body}"


@pytest.mark.parametrize("model", sorted(REQUIRED))
def test_schemas_declare_what_clients_require(model: str) -> None:
    declared = getattr(schemas, model).model_json_schema(mode="serialization")["required"]
    assert REQUIRED[model] <= set(declared)


def test_tgi_answers_carry_what_tgi_requires(client: TestClient) -> None:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "details": True}}
    for answer in (client.post("/generate", json=body).json(), client.post("/", json=body).json()[0]):
        _has_required("GenerateResponse", answer)
        _has_required("Details", answer["details"])
        for token in answer["details"]["tokens"]:
            _has_required("Token", token)
        for token in answer["details"]["prefill"]:
            _has_required("PrefillToken", token)
    for route in ("/generate_stream", "/"):
        events = _sse(client.post(route, json={**body, "stream": True}).text)
        for event in events:
            _has_required("StreamResponse", event)
            _has_required("Token", event["token"])
        _has_required("StreamDetails", events[-1]["details"])
    for inputs in ("x" * 100, "overload", "fail"):
        _has_required("ErrorResponse", client.post("/generate", json={"inputs": inputs}).json())
    _has_required("ErrorResponse", _sse(client.post("/generate_stream", json={"inputs": "fail"}).text)[-1])


def test_completions_carry_what_openai_and_tgi_require(client: TestClient) -> None:
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 2, "logprobs": 1}
    completion = client.post("/v1/completions", json=body).json()
    _has_required("Completion", completion)
    _has_required("CompletionUsage", completion["usage"])
    for choice in completion["choices"]:
        _has_required("CompletionChoice", choice)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    *chunks, last = _sse(client.post("/v1/completions", json=streamed).text)
    for chunk in chunks:
        _has_required("Completion", chunk)
        (choice,) = chunk["choices"]
        _has_required("CompletionChoice", choice)
        assert choice["logprobs"]["tokens"] == [choice["text"]]
    assert last["choices"] == []
    _has_required("CompletionUsage", last["usage"])
    error = client.post("/v1/completions", json={**body, "n": 2}).json()
    _has_required("OpenAIError", error["error"])


# ---- OpenAI ----------------------------------------------------------------------------------


def test_openai_completions(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": ["one", "two"], "max_tokens": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["ab", "ab"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_tokens"] == 8


def test_openai_model_names_a_prompt(client: TestClient, engine: FakeEngine) -> None:
    assert _upload(client, "qa", _prompt_bytes(suffix=4)).status_code == 201
    for model in ("qa", "fake-model:qa"):
        r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        assert engine.requests[-1].prompt_id == "qa"
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["fake-model", "qa"]
    assert models[1]["parent"] == "fake-model"
    unknown = client.post("/v1/completions", json={"model": "gpt-x", "prompt": "x"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "prompt_not_found"
    assert unknown.json()["error"]["code"] == 404


def test_openai_stream_ends_with_done(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 3, "stream": True})
    lines = [line for line in r.text.splitlines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_validation_uses_openai_envelope(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "n": 3})
    assert r.status_code == 422
    assert "n" in r.json()["error"]["message"]


# ---- soft prompts ------------------------------------------------------------------------------


def test_prompt_lifecycle(client: TestClient) -> None:
    data = _prompt_bytes(prefix=3, decoder_prefix=1)
    created = _upload(client, "task-1", data)
    assert created.status_code == 201
    record = created.json()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["num_virtual_tokens"] == {"prefix": 3, "decoder_prefix": 1}
    assert created.headers["location"] == "/prompts/task-1"
    assert [p["id"] for p in client.get("/prompts").json()["data"]] == ["task-1"]
    assert client.get("/prompts/task-1").json()["size_bytes"] == len(data)
    assert client.get("/prompts/task-1/file").content == data
    assert _upload(client, "task-1", data).status_code == 409
    assert client.delete("/prompts/task-1").status_code == 204
    assert client.get("/prompts/task-1").status_code == 404
    assert client.delete("/prompts/task-1").status_code == 404


@pytest.mark.parametrize(
    ("prompt_id", "data", "status"),
    [
        ("p", pickle.dumps({"prefix": torch.randn(2, D_MODEL)}), 415),
        ("p", b"garbage", 415),
        ("p", save_safetensors({"prefix": torch.randn(2, D_MODEL + 1)}), 422),
        ("p", save_safetensors({"prefix": torch.full((2, D_MODEL), float("inf"))}), 422),
        ("p", save_safetensors({"weights": torch.randn(2, D_MODEL)}), 422),
        ("../escape", save_safetensors({"prefix": torch.randn(2, D_MODEL)}), 422),
        ("a/b", save_safetensors({"prefix": torch.randn(2, D_MODEL)}), 422),
        ("ünïcode", save_safetensors({"prefix": torch.randn(2, D_MODEL)}), 422),
    ],
)
def test_bad_uploads_leave_the_store_unchanged(client: TestClient, prompt_id: str, data: bytes, status: int) -> None:
    r = _upload(client, prompt_id, data)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert client.get("/prompts").json()["data"] == []


def test_upload_size_limit(tmp_path: Path, engine: FakeEngine) -> None:
    with local_client(create_app(_settings(tmp_path, max_prompt_upload_bytes=1000), engine)) as client:
        r = _upload(client, "big", _prompt_bytes(prefix=100))
        assert r.status_code == 413
        assert "1000" in r.json()["error"]


# ---- auth --------------------------------------------------------------------------------------


def test_api_key_and_admin_token(tmp_path: Path, engine: FakeEngine) -> None:
    settings = _settings(tmp_path, api_key="s3cret-key", admin_token="admin-t0ken")
    with local_client(create_app(settings, engine)) as client:
        body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
        assert client.post("/generate", json=body).status_code == 401
        wrong = client.post("/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "s3cret" not in wrong.text
        assert client.post("/generate", json=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        data = _prompt_bytes(prefix=1)
        assert _upload(client, "p", data).status_code == 401
        denied = _upload(client, "p", data, Authorization="Bearer s3cret-key")
        assert denied.status_code == 401
        assert "admin-t0ken" not in denied.text
        assert _upload(client, "p", data, Authorization="Bearer admin-t0ken").status_code == 201


def test_blank_keys_mean_unset(tmp_path: Path, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # compose's `${CPM2_ADMIN_TOKEN:-}` and an empty Secret must not make "" the key.
    monkeypatch.setenv("CPM2_API_KEY", "")
    monkeypatch.setenv("CPM2_ADMIN_TOKEN", " ")
    settings = _settings(tmp_path)
    assert settings.api_key is None
    assert settings.admin_token is None
    with TestClient(create_app(settings, engine), client=("203.0.113.7", 5000)) as remote:
        assert _upload(remote, "p", _prompt_bytes(prefix=1), **{"x-api-key": ""}).status_code == 403


# ---- probes, info, metrics, limits ------------------------------------------------------------


def test_health_ready_and_drain(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/ready").status_code == 200
    engine.status = "stalled"
    assert client.get("/health").status_code == 503
    assert client.get("/ready").status_code == 503
    engine.status = "ok"
    client.app.state.ctx.draining = True  # type: ignore[attr-defined]
    assert client.get("/ready").status_code == 503
    r = client.post("/generate", json={"inputs": "x"})
    assert r.status_code == 503
    assert r.json()["error_type"] == "unavailable"
    assert r.headers["retry-after"] == "5"


def test_lifespan_starts_and_drains_the_engine(tmp_path: Path, engine: FakeEngine) -> None:
    with local_client(create_app(_settings(tmp_path), engine)):
        assert engine.started
    assert engine.drained


def test_info_tokenize_and_openapi(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["model_id"] == "fake-model"
    assert info["max_input_tokens"] == 64
    assert info["experts_offloaded"] is True
    assert _upload(client, "v", _prompt_bytes(prefix=2, suffix=1, decoder_prefix=3)).status_code == 201
    tokens = client.post("/tokenize", json={"inputs": "ab", "text_pair": "c", "prompt_id": "v"}).json()
    assert [t["segment"] for t in tokens["tokens"]] == ["inputs", "inputs", "text_pair", "text_pair"]
    assert tokens["input_length"] == 4 + 3
    assert client.get("/openapi.json").status_code == 200


def test_metrics(client: TestClient) -> None:
    client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    client.post("/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    client.post("/generate", json={"inputs": "hello", "parameters": {"top_p": 9}})
    text = client.get("/metrics").text
    assert 'cpm2_requests_total{code="200",route="/generate"} 1.0' in text
    assert 'cpm2_requests_total{code="422",route="/generate"} 1.0' in text
    assert 'cpm2_time_to_first_token_seconds_count{route="generate_stream"} 1.0' in text
    assert "cpm2_inter_token_latency_seconds_count 3.0" in text
    assert 'cpm2_request_success_total{finish_reason="length",route="generate"} 1.0' in text
    assert "cpm2_expert_bytes_moved_total 4096.0" in text
    assert "cpm2_batch_size_count" in text
    assert "cpm2_build_info{" in text
    assert "cpm2_engine_steps_total 7.0" in text
    assert "cpm2_requests_waiting 0.0" in text


def test_payload_limit(tmp_path: Path, engine: FakeEngine) -> None:
    with local_client(create_app(_settings(tmp_path, payload_limit=100), engine)) as client:
        r = client.post("/generate", json={"inputs": "x" * 200})
        assert r.status_code == 413
        assert r.json()["error_type"] == "too_large"


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`CPM2_{name.upper()}`" in readme, f"README lacks CPM2_{name.upper()}"


def test_bundled_prompts_are_served_read_only_beside_uploads(tmp_path: Path, engine: FakeEngine) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "num2zh.safetensors").write_bytes(_prompt_bytes(prefix=3))
    (bundle / "same.safetensors").write_bytes(_prompt_bytes(prefix=2, infix=1, suffix=2))
    (bundle / "notes.txt").write_text("not a prompt")
    settings = _settings(tmp_path, bundled_prompts=bundle)
    with local_client(create_app(settings, engine)) as client:
        assert _upload(client, "mine", _prompt_bytes(prefix=1)).status_code == 201
        listed = {p["id"]: p for p in client.get("/prompts").json()["data"]}
        assert sorted(listed) == ["mine", "num2zh", "same"]
        assert listed["same"]["num_virtual_tokens"] == {"prefix": 2, "infix": 1, "suffix": 2}
        assert listed["num2zh"]["sha256"] == hashlib.sha256((bundle / "num2zh.safetensors").read_bytes()).hexdigest()
        file = client.get("/prompts/num2zh/file")
        assert file.content == (bundle / "num2zh.safetensors").read_bytes()
        used = client.post("/generate", json={"inputs": "7", "parameters": {"prompt_id": "same", "text_pair": "七"}})
        assert used.status_code == 200
        # Read-only: neither replaced nor deleted, with a message saying what to do instead.
        clash = _upload(client, "num2zh", _prompt_bytes(prefix=5))
        assert clash.status_code == 409
        assert "bundled with the model" in clash.json()["error"]
        gone = client.delete("/prompts/same")
        assert gone.status_code == 409
        assert "bundled" in gone.json()["error"]
    # Nothing was written for the bundle: the store holds only the upload.
    assert sorted(p.name for p in (tmp_path / "prompts").iterdir()) == ["mine"]


def test_a_bad_bundled_prompt_stops_start_up_naming_the_file(tmp_path: Path, engine: FakeEngine) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "good.safetensors").write_bytes(_prompt_bytes(prefix=3))
    (bundle / "wide.safetensors").write_bytes(SoftPrompt(prefix=torch.randn(2, D_MODEL + 1)).to_bytes())
    app = create_app(_settings(tmp_path, bundled_prompts=bundle), engine)
    with pytest.raises(InputError, match=r"wide\.safetensors cannot be loaded"), local_client(app):
        pass
    # The upload size limit holds for bundled files too (validated exactly as an upload is).
    (bundle / "wide.safetensors").unlink()
    small = create_app(_settings(tmp_path, bundled_prompts=bundle, max_prompt_upload_bytes=100), engine)
    with pytest.raises(InputError, match=r"good\.safetensors cannot be loaded.*limit is 100"), TestClient(small):
        pass
    missing = _settings(tmp_path, bundled_prompts=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is not a directory"), local_client(create_app(missing, engine)):
        pass


def test_no_bundle_in_the_model_dir_serves_no_bundled_prompt(client: TestClient) -> None:
    assert client.get("/prompts").json()["data"] == []
