"""Credentials: which routes need the API key or the admin token, and that neither ever leaks.

Every route is driven with no key, a wrong key, a key that is a prefix of the right one, the other
credential, and the key in the query string; all are refused with 401 in the error shape, and
neither secret appears in any response body or header nor in any log record (captured at DEBUG
from every logger), nor in a real server process's log, uvicorn's access log included.
(Who may write prompts without an admin token is tested in test_trust.py.)
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from server_fakes import D_MODEL, FakeEngine
from server_process import server_process

from engine.prompts import SoftPrompt
from server import auth
from server.app import create_app
from server.cli import drop_query_string
from server.settings import Settings

API_KEY = "k3y-0f-the-api-9f2c"
ADMIN_TOKEN = "adm1n-t0ken-77d1"
SECRETS = (API_KEY, ADMIN_TOKEN)
PROMPT = "stored"

_GENERATE = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
#: Routes that need the API key: (method, path, JSON body).
API_ROUTES: list[tuple[str, str, object]] = [
    ("POST", "/generate", _GENERATE),
    ("POST", "/generate_stream", _GENERATE),
    ("POST", "/", _GENERATE),
    ("POST", "/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": 1}),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"inputs": "x"}),
    ("GET", "/prompts", None),
    ("GET", f"/prompts/{PROMPT}", None),
]
#: Routes that need the admin token (the prompt file is admin-only: it is the trained artefact).
ADMIN_ROUTES: list[tuple[str, str]] = [
    ("DELETE", f"/prompts/{PROMPT}"),
    ("GET", f"/prompts/{PROMPT}/file"),
]
OPEN_ROUTES = ["/health", "/ready", "/metrics", "/info"]


def _wrong_credentials(right: str, other: str) -> list[dict[str, str]]:
    """Header sets that must all be refused where `right` is expected."""
    return [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Bearer {right[:-1]}"},  # a prefix of the right key
        {"Authorization": f"Bearer {right}x"},  # the right key plus a character
        {"Authorization": f"Basic {right}"},  # the right key under another scheme
        {"Authorization": "Bearer"},
        {"X-API-Key": right[:-1]},
        {"Authorization": f"Bearer {other}"},  # the other credential
        {"X-API-Key": other},
    ]


def _prompt_bytes() -> bytes:
    return SoftPrompt(prefix=torch.randn(2, D_MODEL)).to_bytes()


def _upload(client: TestClient, prompt_id: str, headers: dict[str, str], params: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    files = {"file": ("p.safetensors", _prompt_bytes(), "application/octet-stream")}
    return client.post("/prompts", files=files, data={"id": prompt_id}, headers=headers, params=params)


@pytest.fixture
def client(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[TestClient]:
    caplog.set_level(logging.DEBUG)  # the root logger at DEBUG: every logger's records are captured
    settings = Settings(prompt_store=tmp_path / "prompts", api_key=API_KEY, admin_token=ADMIN_TOKEN)
    # A remote client address: the admin token, not loopback, must be what lets writes through.
    with TestClient(create_app(settings, FakeEngine()), client=("203.0.113.7", 5000)) as test_client:
        created = _upload(test_client, PROMPT, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert created.status_code == 201, created.text
        yield test_client
    assert_no_secret_logged(caplog)


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    # httpx / httpcore are the test's HTTP client, not the server: they log the URLs it requests,
    # query strings included, which a real server never sees in its own process.
    records = caplog.get_records("setup") + caplog.get_records("call")
    server_records = [r for r in records if not r.name.startswith(("httpx", "httpcore"))]
    assert server_records, "nothing was logged: the capture is not working"
    for record in server_records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in SECRETS:
            assert secret not in text, (record.name, text)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    body = response.json()
    if response.request.url.path.startswith("/v1/"):
        assert body["error"]["type"] == "unauthorized", body
        assert body["error"]["code"] == 401, body
    else:
        assert set(body) == {"error", "error_type"}, body
        assert body["error_type"] == "unauthorized", body
    assert_nothing_echoed(response)


def assert_nothing_echoed(response: httpx.Response) -> None:
    for secret in SECRETS:
        assert secret not in response.text
        for name, value in response.headers.items():
            assert secret not in name
            assert secret not in value


@pytest.mark.parametrize(("method", "path", "body"), API_ROUTES)
def test_api_routes_refuse_missing_or_wrong_keys(client: TestClient, method: str, path: str, body: object) -> None:
    for headers in _wrong_credentials(API_KEY, ADMIN_TOKEN):
        assert_refused(client.request(method, path, json=body, headers=headers))
    # A key in the query string is not a credential (it would end up in logs and proxies' caches).
    for name in ("api_key", "key", "access_token", "token"):
        assert_refused(client.request(method, path, json=body, params={name: API_KEY}))
    for headers in (
        {"Authorization": f"Bearer {API_KEY}"},
        {"authorization": f"bearer {API_KEY}"},
        {"X-API-Key": API_KEY},
    ):
        accepted = client.request(method, path, json=body, headers=headers)
        assert accepted.status_code == 200, (path, accepted.text)
        assert_nothing_echoed(accepted)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_refuse_missing_or_wrong_tokens(client: TestClient, method: str, path: str) -> None:
    for headers in _wrong_credentials(ADMIN_TOKEN, API_KEY):
        assert_refused(client.request(method, path, headers=headers))
    assert_refused(client.request(method, path, params={"token": ADMIN_TOKEN}))
    accepted = client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert accepted.status_code in (200, 204), accepted.text
    assert_nothing_echoed(accepted)


def test_upload_refuses_missing_or_wrong_tokens(client: TestClient) -> None:
    for headers in _wrong_credentials(ADMIN_TOKEN, API_KEY):
        assert_refused(_upload(client, "new", headers))
    assert_refused(_upload(client, "new", {}, params={"token": ADMIN_TOKEN}))
    # Nothing was stored by the refused uploads.
    listed = client.get("/prompts", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    assert [r["id"] for r in listed] == [PROMPT]
    assert _upload(client, "new", {"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 201


@pytest.mark.parametrize("path", OPEN_ROUTES)
def test_probes_and_metrics_stay_open(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert_nothing_echoed(r)
    # A wrong key does not turn an open route into a refused one.
    assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 200


def test_refusals_are_counted_without_credentials(client: TestClient) -> None:
    client.post("/generate", json=_GENERATE, headers={"Authorization": f"Bearer {API_KEY[:-1]}"})
    metrics = client.get("/metrics").text
    assert 'cpm2_requests_total{code="401",route="/generate"} 1.0' in metrics
    for secret in SECRETS:
        assert secret[:-1] not in metrics


def test_keys_are_compared_in_constant_time() -> None:
    # The comparison itself: hmac.compare_digest takes the same time wherever the strings differ
    # (no timing test here; those are flaky and prove little on a shared machine).
    source = inspect.getsource(auth._matches)
    assert "hmac.compare_digest" in source
    assert auth._matches(API_KEY, API_KEY)
    assert not auth._matches(API_KEY[:-1], API_KEY)
    assert not auth._matches(None, API_KEY)
    assert auth.hmac is hmac
    # Both checks go through it, never through `==`.
    for check in (auth.check_api_key, auth.check_admin):
        source = inspect.getsource(check)
        assert "_matches(" in source
        assert "==" not in source


def test_access_log_filter_drops_query_strings() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", f"/generate?api_key={API_KEY}", "1.1", 401),
        None,
    )
    assert drop_query_string(record)
    assert record.getMessage() == '127.0.0.1:5000 - "POST /generate HTTP/1.1" 401'


@pytest.mark.slow
def test_server_process_logs_no_secret(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {"CPM2_API_KEY": API_KEY, "CPM2_ADMIN_TOKEN": ADMIN_TOKEN, "CPM2_LOG_LEVEL": "debug"}
    with server_process(tiny_model_dir, tmp_path, env=env) as (_, url), httpx.Client(base_url=url, timeout=30) as http:
        for headers in _wrong_credentials(API_KEY, ADMIN_TOKEN):
            assert http.post("/generate", json=_GENERATE, headers=headers).status_code == 401
        for headers in _wrong_credentials(ADMIN_TOKEN, API_KEY):
            assert http.delete("/prompts/x", headers=headers).status_code == 401
        assert http.post("/generate", json=_GENERATE, params={"api_key": API_KEY}).status_code == 401
        assert http.get("/health", params={"token": ADMIN_TOKEN}).status_code == 200
        ok = http.post("/generate", json=_GENERATE, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, ok.text
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert '"POST /generate HTTP/1.1" 401' in log  # the access log is on, and was read
    assert '"GET /health HTTP/1.1" 200' in log
    for secret in SECRETS:
        assert secret not in log
        assert secret[:-1] not in log
