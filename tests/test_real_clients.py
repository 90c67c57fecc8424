"""The server driven over real HTTP by the clients people use, at their current releases.

HF's `text-generation` (`Client`, `AsyncClient`) and the official `openai` client read every answer
into their own pydantic types and turn error answers into typed exceptions; text-generation 0.7
refuses a `details` without `prefill`, for instance. One uvicorn server on loopback, with the real
engine on the tiny model, serves the whole module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import text_generation
from fastapi.testclient import TestClient
from openai.types import CompletionChoice
from server_fakes import FakeEngine
from server_process import serve_in_thread
from text_generation import errors as tgi_errors
from text_generation.types import FinishReason, Response, StreamResponse

from engine.serving.engine import AsyncEngine, EngineConfig
from server.app import create_app
from server.settings import Settings

# text-generation 0.7 still calls pydantic v1's `.dict()` on its own request models.
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")

MAX_TOTAL_TOKENS = 96
PROMPT = "北京是中国的"


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A uvicorn server in a thread, on a loopback socket bound here (no port race)."""
    engine = AsyncEngine.from_config(EngineConfig(model=tiny_model_dir, max_batch_size=4, max_queue=16))
    settings = Settings(
        prompt_store=tmp_path_factory.mktemp("store"), max_input_tokens=64, max_total_tokens=MAX_TOTAL_TOKENS
    )
    with serve_in_thread(create_app(settings, engine)) as url:
        yield url


@pytest.fixture(scope="module")
def tgi(base_url: str) -> text_generation.Client:
    return text_generation.Client(base_url, timeout=60)


@pytest.fixture(scope="module")
def model_name(base_url: str) -> str:
    # The real client reads /v1/models too.
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    (base, *_) = client.models.list().data
    return base.id


def _generate_raw(base_url: str, parameters: dict[str, object]) -> dict:
    body = {"inputs": PROMPT, "parameters": {**parameters, "details": True}}
    r = httpx.post(f"{base_url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _check_details(response: Response, *, max_new_tokens: int) -> None:
    # Token texts add up to the output, except bytes of a character the output ends in the middle of:
    # a token holds its text back until the character is whole, and the final text decodes all.
    details = response.details
    assert details.prefill == []  # no decoder_input_details
    assert details.generated_tokens == len(details.tokens) <= max_new_tokens
    assert details.finish_reason in (FinishReason.Length, FinishReason.EndOfSequenceToken)
    if details.finish_reason is FinishReason.Length:
        assert details.generated_tokens == max_new_tokens
    assert response.generated_text.startswith("".join(t.text for t in details.tokens))
    assert all(t.logprob is not None and t.logprob <= 0 for t in details.tokens)


# ---- text-generation ---------------------------------------------------------------------------


def test_tgi_client_generate(tgi: text_generation.Client, base_url: str) -> None:
    # The client always asks for details and posts to TGI's `/`.
    response = tgi.generate(PROMPT, max_new_tokens=5)
    _check_details(response, max_new_tokens=5)
    assert response.details.seed is None  # greedy
    raw = _generate_raw(base_url, {"max_new_tokens": 5})
    assert response.generated_text == raw["generated_text"]
    assert [t.id for t in response.details.tokens] == [t["id"] for t in raw["details"]["tokens"]]


def test_tgi_client_sampling_reports_its_seed(tgi: text_generation.Client) -> None:
    first = tgi.generate(PROMPT, max_new_tokens=5, do_sample=True, temperature=0.9, seed=7)
    _check_details(first, max_new_tokens=5)
    assert first.details.seed == 7
    again = tgi.generate(PROMPT, max_new_tokens=5, do_sample=True, temperature=0.9, seed=7)
    assert again.generated_text == first.generated_text


def test_tgi_client_generate_stream(tgi: text_generation.Client) -> None:
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=5))
    assert all(isinstance(e, StreamResponse) for e in events)
    *running, last = events
    assert all(e.details is None and e.generated_text is None for e in running)
    assert last.details is not None
    assert last.details.generated_tokens == len(events)
    assert last.details.finish_reason in (FinishReason.Length, FinishReason.EndOfSequenceToken)
    assert last.generated_text is not None
    assert last.generated_text.startswith("".join(e.token.text for e in events))
    assert last.generated_text == tgi.generate(PROMPT, max_new_tokens=5).generated_text


def test_tgi_async_client(tgi: text_generation.Client, base_url: str) -> None:
    async def both() -> tuple[Response, list[StreamResponse]]:
        client = text_generation.AsyncClient(base_url, timeout=60)
        response = await client.generate(PROMPT, max_new_tokens=4)
        events = [e async for e in client.generate_stream(PROMPT, max_new_tokens=4)]
        return response, events

    response, events = asyncio.run(both())
    _check_details(response, max_new_tokens=4)
    assert events[-1].generated_text == response.generated_text
    assert response.generated_text == tgi.generate(PROMPT, max_new_tokens=4).generated_text


def test_tgi_client_raises_its_validation_error(tgi: text_generation.Client, base_url: str) -> None:
    # Values the client lets through and the server refuses (422, error_type "validation").
    with pytest.raises(tgi_errors.ValidationError, match="watermark"):
        tgi.generate(PROMPT, watermark=True)
    with pytest.raises(tgi_errors.ValidationError, match="max_total_tokens"):
        tgi.generate(PROMPT, max_new_tokens=MAX_TOTAL_TOKENS)
    with pytest.raises(tgi_errors.ValidationError, match="top_n_tokens"):
        next(iter(tgi.generate_stream(PROMPT, top_n_tokens=2)))

    async def refused() -> None:
        await text_generation.AsyncClient(base_url, timeout=60).generate(PROMPT, watermark=True)

    with pytest.raises(tgi_errors.ValidationError, match="watermark"):
        asyncio.run(refused())


@pytest.mark.parametrize(
    ("inputs", "status", "error"),
    [
        ("overload me", 429, tgi_errors.OverloadedError),
        ("fail", 500, tgi_errors.GenerationError),
        ("deadline", 504, tgi_errors.ShardTimeoutError),
        ("x" * 200, 422, tgi_errors.ValidationError),
    ],
)
def test_tgi_client_reads_every_error_body(tmp_path: Path, inputs: str, status: int, error: type) -> None:
    # Engine failures a real tiny engine cannot be made to produce, from the fake engine: the
    # client's own `parse_error` (which reads `error_type`, then the status) picks the exception.
    settings = Settings(prompt_store=tmp_path, max_input_tokens=64, max_total_tokens=MAX_TOTAL_TOKENS)
    with TestClient(create_app(settings, FakeEngine())) as client:
        r = client.post("/", json={"inputs": inputs, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == status
    assert isinstance(tgi_errors.parse_error(r.status_code, r.json()), error)


# ---- openai ------------------------------------------------------------------------------------


def _logprob_tokens(choice: CompletionChoice) -> list[str]:
    assert choice.logprobs is not None
    assert choice.logprobs.tokens is not None
    return choice.logprobs.tokens


def test_openai_completions(base_url: str, model_name: str, tgi: text_generation.Client) -> None:
    # Strict: every field is validated against openai-python's types, not just read leniently.
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, _strict_response_validation=True)
    completion = client.completions.create(model=model_name, prompt=[PROMPT, "hello"], max_tokens=5, logprobs=1)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == model_name
    assert abs(completion.created - time.time()) < 600
    assert completion.system_fingerprint
    assert [c.index for c in completion.choices] == [0, 1]
    first = completion.choices[0]
    assert first.text == tgi.generate(PROMPT, max_new_tokens=5).generated_text  # greedy on both routes
    assert first.finish_reason in ("length", "stop")
    assert first.text.startswith("".join(_logprob_tokens(first)))
    assert first.logprobs is not None
    assert first.logprobs.token_logprobs is not None
    assert len(first.logprobs.token_logprobs) == len(_logprob_tokens(first))
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == sum(len(_logprob_tokens(c)) for c in completion.choices)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_stream(base_url: str, model_name: str) -> None:
    # Not strict: OpenAI's own streams send `finish_reason: null` on every chunk but the last, which
    # openai-python's `Completion` type does not allow (it reads chunks leniently for that reason).
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5)
    stream = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=5, stream=True, logprobs=1, stream_options={"include_usage": True}
    )
    *chunks, usage_chunk = list(stream)
    required = {"id", "object", "created", "model", "system_fingerprint", "choices"}
    for chunk in [*chunks, usage_chunk]:
        assert required <= chunk.model_fields_set
        assert (chunk.id, chunk.object, chunk.model) == (chunks[0].id, "text_completion", model_name)
        assert chunk.system_fingerprint == whole.system_fingerprint
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.choices[0].text.startswith("".join(c.choices[0].text for c in chunks))
    assert all(c.choices[0].logprobs is not None for c in chunks)
    # stream_options.include_usage: one more chunk with no choices and the usage.
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(chunks)
    assert whole.usage is not None
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage_chunk.usage.total_tokens == whole.usage.total_tokens


def test_openai_errors_are_typed(base_url: str, model_name: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model=model_name, prompt=PROMPT, n=3)
    assert refused.value.type == "validation"
    assert "does not support n;" in refused.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-x", prompt=PROMPT)
    assert unknown.value.type == "prompt_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=model_name, prompt=[PROMPT, PROMPT], stream=True)
