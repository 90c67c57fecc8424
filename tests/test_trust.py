"""Who may write prompts: closed by default, opened by the admin token or by trusting local peers.

In-process clients check each rule; then a real nginx on loopback, in front of a real uvicorn
server, shows the case the opt-in warns about and the one it guards: a proxy on the same host
connects from 127.0.0.1 on behalf of remote clients. nginx comes from Debian (`apt-get install
nginx`); the nginx tests skip without it, except where CPM2_REQUIRE_NGINX=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from server_fakes import D_MODEL, FakeEngine, local_client
from server_process import free_port, serve_in_thread

from engine.prompts import SoftPrompt
from server.app import create_app
from server.auth import FORBIDDEN_WRITES
from server.settings import Settings

ADMIN_TOKEN = "adm1n-t0ken-for-trust"
REMOTE_PEER = ("203.0.113.7", 5000)


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(prompt_store=tmp_path / "prompts", **overrides)  # type: ignore[arg-type]


def _prompt() -> bytes:
    return SoftPrompt(prefix=torch.randn(2, D_MODEL)).to_bytes()


def _upload(client: httpx.Client | TestClient, prompt_id: str, headers: dict[str, str] | None = None) -> Any:
    files = {"file": ("p.safetensors", _prompt(), "application/octet-stream")}
    return client.post("/prompts", files=files, data={"id": prompt_id}, headers=headers or {})


def _write_routes(client: TestClient, prompt_id: str, headers: dict[str, str] | None = None) -> list[int]:
    """Status of upload, download and delete of `prompt_id`."""
    return [
        _upload(client, prompt_id, headers).status_code,
        client.get(f"/prompts/{prompt_id}/file", headers=headers or {}).status_code,
        client.delete(f"/prompts/{prompt_id}", headers=headers or {}).status_code,
    ]


def test_prompt_writes_are_closed_by_default(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert (settings.admin_token, settings.allow_local_admin) == (None, False)
    with local_client(create_app(settings, FakeEngine())) as client:
        refused = _upload(client, "p")
        assert refused.status_code == 403
        message = refused.json()["error"]
        assert message == FORBIDDEN_WRITES
        assert "CPM2_ADMIN_TOKEN" in message
        assert "--allow-local-admin" in message
        assert _write_routes(client, "p") == [403, 403, 403]
        # Reading and using prompts is not a write: still open.
        assert client.get("/prompts").status_code == 200
        assert client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}).status_code == 200
    assert not (tmp_path / "prompts").exists() or not any((tmp_path / "prompts").glob("p*"))


def test_allow_local_admin_trusts_loopback_peers_only(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, allow_local_admin=True), FakeEngine())
    with local_client(app) as local:
        assert _write_routes(local, "p") == [201, 200, 204]
    for peer in [REMOTE_PEER, ("10.0.0.5", 1234), ("::ffff:203.0.113.7", 1)]:
        with TestClient(app, client=peer) as remote:
            assert _upload(remote, "p").status_code == 403
    # Starlette's test client calls itself "testclient": no address, so no trust (none in production code).
    with TestClient(app) as unnamed:
        assert _upload(unnamed, "p").status_code == 403
    with TestClient(app, client=("::1", 5000)) as ipv6_local:
        assert _upload(ipv6_local, "p6").status_code == 201


@pytest.mark.parametrize(
    "header",
    [
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": "203.0.113.7"},
        {"Forwarded": "for=127.0.0.1"},
        {"X-Real-IP": "127.0.0.1"},
    ],
)
def test_a_forwarded_request_is_never_local(tmp_path: Path, header: dict[str, str]) -> None:
    with local_client(create_app(_settings(tmp_path, allow_local_admin=True), FakeEngine())) as client:
        refused = _upload(client, "p", header)
        assert refused.status_code == 403
        assert "not through a proxy" in refused.json()["error"]


def test_the_admin_token_is_required_once_set_even_locally(tmp_path: Path) -> None:
    settings = _settings(tmp_path, allow_local_admin=True, admin_token=ADMIN_TOKEN)
    with local_client(create_app(settings, FakeEngine())) as client:
        assert _write_routes(client, "p") == [401, 401, 401]
        good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert _write_routes(client, "p", good) == [201, 200, 204]
    with TestClient(create_app(settings, FakeEngine()), client=REMOTE_PEER) as remote:
        assert _upload(remote, "q", {"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 201


def test_start_up_says_who_may_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({}, "prompt writes are disabled"),
        ({"allow_local_admin": True}, "every loopback peer"),
        ({"admin_token": ADMIN_TOKEN}, "need the admin token"),
    ]
    for overrides, said in cases:
        caplog.clear()
        with (
            caplog.at_level("INFO", logger="cpm2.server"),
            local_client(create_app(_settings(tmp_path, **overrides), FakeEngine())),
        ):
            pass
        assert said in caplog.text


def test_make_serve_opts_in() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    serve = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "--allow-local-admin" in serve


# ---- behind a real reverse proxy --------------------------------------------------------------


def _nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        if os.environ.get("CPM2_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required here (CPM2_REQUIRE_NGINX=1): apt-get install nginx")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


@contextmanager
def nginx_proxy(upstream: str, workdir: Path, *, forwarded_headers: bool) -> Iterator[str]:
    """nginx on a free loopback port proxying to `upstream`; with `forwarded_headers` it sends
    X-Forwarded-For / X-Real-IP as a proxy configured by the book does, without them as many do."""
    exe = _nginx()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    forward = (
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Real-IP $remote_addr;"
        if forwarded_headers
        else ""
    )
    temp = " ".join(
        f"{kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = workdir / "nginx.conf"
    config.write_text(
        f"""
daemon off;
master_process off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {temp}
    client_max_body_size 16m;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass {upstream}; proxy_http_version 1.1; {forward} }}
    }}
}}
"""
    )
    process = subprocess.Popen(
        [exe, "-c", str(config), "-p", str(workdir), "-e", str(workdir / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited: {(workdir / 'error.log').read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not start listening")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def through_nginx(
    tmp_path: Path, *, forwarded_headers: bool = True, **overrides: object
) -> Iterator[tuple[str, httpx.Client]]:
    """A real server with `overrides`, nginx in front of it; yields the server's own url and a
    client that goes through nginx."""
    settings = _settings(tmp_path, **overrides)
    with (
        serve_in_thread(create_app(settings, FakeEngine()), settings=settings) as upstream,
        nginx_proxy(upstream, tmp_path / "nginx", forwarded_headers=forwarded_headers) as proxy,
        httpx.Client(base_url=proxy, timeout=30) as through,
    ):
        yield upstream, through


def test_behind_nginx_closed_by_default(tmp_path: Path) -> None:
    with through_nginx(tmp_path) as (_, through):
        assert _upload(through, "p").status_code == 403
        assert through.post("/generate", json={"inputs": "x"}).status_code == 200  # the proxy works


@pytest.mark.parametrize("trusted_proxy", ["", "127.0.0.1"])
def test_behind_nginx_a_local_opt_in_does_not_open_remote_writes(tmp_path: Path, trusted_proxy: str) -> None:
    """The opt-in trusts loopback peers, but nginx says it forwards someone: refused, whether or not
    its forwarding headers are believed (CPM2_FORWARDED_ALLOW_IPS), and whatever the client forges."""
    with through_nginx(tmp_path, allow_local_admin=True, forwarded_allow_ips=trusted_proxy) as (upstream, through):
        assert _upload(through, "p").status_code == 403
        assert _upload(through, "p", {"X-Forwarded-For": "127.0.0.1"}).status_code == 403
        assert _upload(httpx.Client(base_url=upstream), "p").status_code == 201  # this machine, not the proxy


def test_behind_nginx_the_admin_token_decides(tmp_path: Path) -> None:
    with through_nginx(tmp_path, admin_token=ADMIN_TOKEN, allow_local_admin=True) as (_, through):
        assert _upload(through, "p").status_code == 401
        assert _upload(through, "p", {"Authorization": "Bearer wrong"}).status_code == 401
        assert _upload(through, "p", {"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 201


@pytest.mark.parametrize(("allow_local_admin", "status"), [(True, 201), (False, 403)])
def test_behind_nginx_without_forwarded_headers_the_opt_in_trusts_the_proxy(
    tmp_path: Path, allow_local_admin: bool, status: int
) -> None:
    """What `--allow-local-admin` documents: a proxy that sends no forwarding headers is just a
    loopback peer, so every client that reaches it may write. Without the opt-in, refused."""
    with through_nginx(tmp_path, forwarded_headers=False, allow_local_admin=allow_local_admin) as (_, through):
        assert _upload(through, "p").status_code == status
