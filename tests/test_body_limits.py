"""Limits that hold for every body, and nothing heavy on the event loop.

A real uvicorn server on loopback (`serve_in_thread`) takes bodies the way clients send them: chunked
(no Content-Length, so no header to check) and sized. Every route answers an oversize body with 413
while it is still arriving (the client is told before it has sent it all), the server keeps none of
it, and a real HTTP client that writes its whole body before reading still reads the 413. An input
that cannot fit `max_input_tokens` is refused by its character count before any token is made;
tokenising and prompt files run in the worker pool, so `/health` answers while they are held.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from server_fakes import D_MODEL, FakeEngine, local_client
from server_process import serve_in_thread

from bench import abuse
from bench.abuse import send_chunked, send_sized_headers
from bench.soak import proc_status
from engine.prompts import SoftPrompt
from server.app import create_app
from server.prompt_store import PromptStore
from server.settings import Settings

PAYLOAD_LIMIT = 64 * 1024
UPLOAD_LIMIT = 256 * 1024
LANGS = ("eng_Latn", "fra_Latn")

#: Every route that reads a body, with the content type it reads.
ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/generate", "application/json"),
    ("POST", "/generate_stream", "application/json"),
    ("POST", "/", "application/json"),
    ("POST", "/v1/completions", "application/json"),
    ("POST", "/tokenize", "application/json"),
    ("POST", "/translate", "application/json"),
    ("POST", "/translate", "application/x-www-form-urlencoded"),
    ("POST", "/detect", "application/json"),
    ("POST", "/prompts", "multipart/form-data; boundary=xyz"),
]
#: Routes that read no body, and what they answer.
BODILESS: list[tuple[str, str, int]] = [("DELETE", "/prompts/some-id", 404), ("GET", "/health", 200)]


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "prompt_store": tmp_path / "prompts",
        "payload_limit": PAYLOAD_LIMIT,
        "max_prompt_upload_bytes": UPLOAD_LIMIT,
        "max_input_tokens": 64,
        "max_total_tokens": 96,
        "allow_local_admin": True,
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = _settings(tmp_path_factory.mktemp("limits"))
    with serve_in_thread(create_app(settings, FakeEngine(languages=LANGS)), settings=settings) as base:
        yield base


def _rss_bytes() -> int:
    return int(proc_status(Path("/proc/self"))["VmRSS"]) * 1024


@pytest.mark.parametrize(("method", "path", "content_type"), ROUTES)
def test_chunked_oversize_body_is_refused_while_it_arrives(url: str, method: str, path: str, content_type: str) -> None:
    total = 32 * 2**20
    status, sent, body = send_chunked(url, method, path, content_type, total)
    assert status == 413, body
    upload = (method, path) == ("POST", "/prompts")
    assert ("CPM2_MAX_PROMPT_UPLOAD_BYTES" if upload else "CPM2_PAYLOAD_LIMIT").encode() in body
    # Told while the body was still arriving: the server stopped at its limit, not at the end.
    assert sent < total // 4, f"the server answered only after {sent} of {total} bytes"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), BODILESS)
def test_a_route_that_reads_no_body_answers_before_it(url: str, method: str, path: str, status: int) -> None:
    total = 32 * 2**20
    answered, sent, _ = send_chunked(url, method, path, "application/json", total)
    assert answered == status
    assert sent < total // 4


@pytest.mark.parametrize(
    ("method", "path", "content_type"), ROUTES + [(method, path, "application/json") for method, path, _ in BODILESS]
)
def test_sized_oversize_body_is_refused_before_it_is_read(url: str, method: str, path: str, content_type: str) -> None:
    # Headers only: a server that waited for the 50 MB it was promised would never answer.
    status, body = send_sized_headers(url, method, path, 50 * 2**20, content_type=content_type)
    assert status == 413, body
    assert str(50 * 2**20) in json.dumps(json.loads(body))


def test_error_shape_is_the_routes(url: str) -> None:
    big = "x" * (PAYLOAD_LIMIT + 1)
    tgi = httpx.post(f"{url}/generate", json={"inputs": big}, timeout=30)
    assert (tgi.status_code, tgi.json()["error_type"]) == (413, "too_large")
    openai = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": big}, timeout=30)
    assert (openai.status_code, openai.json()["error"]["code"]) == (413, 413)
    libre = httpx.post(f"{url}/translate", json={"q": big, "source": "en", "target": "fr"}, timeout=30)
    assert libre.status_code == 413
    assert set(libre.json()) == {"error"}


def test_a_client_that_writes_its_whole_body_first_reads_the_413(url: str) -> None:
    """httpx (like requests and most SDKs) sends the body to the end before reading: the server
    discards the rest instead of resetting the connection, so the client gets the answer."""

    def body() -> Iterator[bytes]:  # a generator: sent chunked
        yield b'{"inputs": "'
        for _ in range(256):
            yield b"a" * 16384

    r = httpx.post(f"{url}/generate", content=body(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["error_type"] == "too_large"


def test_memory_stays_bounded_under_oversize_bodies(url: str) -> None:
    before = _rss_bytes()
    for method, path, content_type in ROUTES[:6] * 2:
        assert send_chunked(url, method, path, content_type, 32 * 2**20)[0] == 413
    # 12 bodies of 32 MiB: read in full, they would have cost gigabytes (the issue saw 3 GiB for one).
    assert _rss_bytes() - before < 64 * 2**20


def test_bodies_within_the_limit_still_work(url: str) -> None:
    inputs = "a" * 50
    r = httpx.post(f"{url}/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 200, r.text
    prompt = SoftPrompt(prefix=torch.randn(2, D_MODEL)).to_bytes()
    up = httpx.post(f"{url}/prompts", files={"file": ("p.safetensors", prompt)}, data={"id": "fits"}, timeout=30)
    assert up.status_code == 201, up.text


# ---- characters before tokens ---------------------------------------------------------------------


class CountingEngine(FakeEngine):
    """Counts the characters it was asked to tokenise."""

    def __init__(self) -> None:
        super().__init__(languages=LANGS)
        self.tokenized_chars = 0

    def tokenize(self, text: str, *, add_eos: bool = True, src_lang: str | None = None) -> list[int]:
        self.tokenized_chars += len(text)
        return super().tokenize(text, add_eos=add_eos, src_lang=src_lang)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "a" * 65}),
        ("/v1/completions", {"model": "fake-model", "prompt": "a" * 65}),
        ("/tokenize", {"inputs": "a" * 40, "text_pair": "b" * 25}),
        ("/translate", {"q": ["ok", "a" * 65], "source": "en", "target": "fr"}),
    ],
)
def test_oversize_input_is_refused_before_it_is_tokenised(tmp_path: Path, path: str, body: dict[str, object]) -> None:
    engine = CountingEngine()
    with local_client(create_app(_settings(tmp_path), engine)) as client:
        r = client.post(path, json=body)
    assert r.status_code == (400 if path == "/translate" else 422), r.text
    message = str(r.json()["error"])
    assert "65 characters; at most 64 fit max_input_tokens" in message, message
    # The over-long text was never tokenised (a batch's short text may have been, beside it).
    assert engine.tokenized_chars <= len("ok")


def test_truncate_takes_a_long_input_and_keeps_its_last_tokens(tmp_path: Path) -> None:
    engine = CountingEngine()
    with local_client(create_app(_settings(tmp_path), engine)) as client:
        body = {"inputs": "b" * 500 + "xyz", "parameters": {"truncate": 4, "max_new_tokens": 1}}
        assert client.post("/generate", json=body).status_code == 200
    assert engine.requests[-1].input_ids == tuple(engine.tokenize("xyz"))


def test_tokenize_has_the_generation_limits(tmp_path: Path) -> None:
    class WideTokens(FakeEngine):
        """Two tokens per character, so the token limit is reached before the character bound."""

        def tokenize(self, text: str, *, add_eos: bool = True, src_lang: str | None = None) -> list[int]:
            return [t for t in super().tokenize(text, add_eos=False) for _ in range(2)] + ([1] if add_eos else [])

    with local_client(create_app(_settings(tmp_path), WideTokens())) as client:
        ok = client.post("/tokenize", json={"inputs": "a" * 31})
        assert ok.status_code == 200
        assert ok.json()["input_length"] == 63
        over = client.post("/tokenize", json={"inputs": "a" * 40})
        assert over.status_code == 422
        assert "81 tokens; the limit is 64" in over.json()["error"]


# ---- nothing heavy on the event loop ----------------------------------------------------------


class GatedEngine(FakeEngine):
    """Tokenising blocks until the test releases it: a request held in the middle of its work."""

    def __init__(self) -> None:
        super().__init__(languages=LANGS)
        self.entered = threading.Event()
        self.release = threading.Event()

    def tokenize(self, text: str, *, add_eos: bool = True, src_lang: str | None = None) -> list[int]:
        self.entered.set()
        assert self.release.wait(30), "never released"
        return super().tokenize(text, add_eos=add_eos, src_lang=src_lang)


def _held(url: str, request: httpx.Request, entered: threading.Event, release: threading.Event) -> int:
    """Send `request`, and while the server is held inside its work, `/health` must answer."""
    result: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: result.append(httpx.Client(timeout=60).send(request)))
    sender.start()
    try:
        assert entered.wait(30), "the request never reached the held work"
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=20)
        waited = time.monotonic() - started
        assert health.status_code == 200
        # Had the work run on the event loop, /health could not have answered before the release.
        assert sender.is_alive(), "the request finished while it should have been held"
    finally:
        release.set()
        sender.join(60)
    print(f"{request.method} {request.url.path}: /health answered in {waited * 1000:.1f} ms while held")
    return result[0].status_code


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "a" * 60, "parameters": {"max_new_tokens": 4}}),
        ("/generate_stream", {"inputs": "a" * 60, "parameters": {"max_new_tokens": 4}}),
        ("/", {"inputs": "a" * 60, "parameters": {"max_new_tokens": 4}}),
        ("/v1/completions", {"model": "fake-model", "prompt": "a" * 60, "max_tokens": 4}),
        ("/tokenize", {"inputs": "a" * 60}),
        ("/translate", {"q": "a" * 60, "source": "en", "target": "fr"}),
    ],
)
def test_health_answers_while_a_request_tokenises(tmp_path: Path, path: str, body: dict[str, object]) -> None:
    engine = GatedEngine()
    settings = _settings(tmp_path)
    with serve_in_thread(create_app(settings, engine), settings=settings) as url:
        request = httpx.Request("POST", f"{url}{path}", json=body)
        assert _held(url, request, engine.entered, engine.release) == 200


@pytest.mark.parametrize("operation", ["create", "file_bytes", "delete"])
def test_health_answers_while_a_prompt_file_is_written_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = getattr(PromptStore, operation)

    def held(self: PromptStore, *args: object, **kwargs: object) -> object:
        entered.set()
        assert release.wait(30)
        return real(self, *args, **kwargs)

    settings = _settings(tmp_path)
    prompt = SoftPrompt(prefix=torch.randn(2, D_MODEL)).to_bytes()
    with serve_in_thread(create_app(settings, FakeEngine()), settings=settings) as url:
        if operation != "create":
            created = httpx.post(f"{url}/prompts", files={"file": ("p.safetensors", prompt)}, data={"id": "p"})
            assert created.status_code == 201
        monkeypatch.setattr(PromptStore, operation, held)
        request = {
            "create": httpx.Request(
                "POST", f"{url}/prompts", files={"file": ("p.safetensors", prompt)}, data={"id": "p"}
            ),
            "file_bytes": httpx.Request("GET", f"{url}/prompts/p/file"),
            "delete": httpx.Request("DELETE", f"{url}/prompts/p"),
        }[operation]
        assert _held(url, request, entered, release) in (200, 201, 204)


def test_a_list_of_texts_is_bounded_like_concurrent_requests(tmp_path: Path) -> None:
    engine = CountingEngine()
    with local_client(create_app(_settings(tmp_path, max_concurrent_requests=3), engine)) as client:
        completions = client.post("/v1/completions", json={"model": "fake-model", "prompt": ["a"] * 4, "max_tokens": 1})
        assert completions.status_code == 422
        assert "prompt: 4 texts in one request; the limit is 3" in completions.json()["error"]["message"]
        translate = client.post("/translate", json={"q": ["a"] * 4, "source": "en", "target": "fr"})
        assert translate.status_code == 400
        assert "q: 4 texts in one request; the limit is 3" in translate.json()["error"]
        assert client.post("/translate", json={"q": ["a"] * 3, "source": "en", "target": "fr"}).status_code == 200
    assert engine.tokenized_chars == 3  # only the list within the limit was tokenised


@pytest.mark.slow
def test_abuse_bench_runs_and_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`python -m bench.abuse` end to end on a real server (small bodies): every oversize body 413."""
    out = tmp_path / "abuse.json"
    assert (
        abuse.main(["--model", str(tiny_model_dir), "--mib", "4", "--payload-limit", "100000", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    statuses = {case["case"]: case["status"] for case in report["cases"]}
    oversize = [name for name in statuses if name.startswith(("chunked", "Content-Length"))]
    assert len(oversize) == 7
    assert all(statuses[name] == 413 for name in oversize), statuses
    assert statuses["longest accepted input -> /generate"] == 200
    assert statuses["body at the limit -> /tokenize"] == 422
    assert report["health_after"] == 200
