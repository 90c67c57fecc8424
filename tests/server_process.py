"""A real `python -m server` process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.cli import uvicorn_config
from server.settings import Settings


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server_process(
    model: Path | str, workdir: Path, *, env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Starts the server on `model`, waits until /ready answers 200, yields (process, base url), kills it.

    Started as `make serve` starts it: prompt writes from this machine need no token
    (`--allow-local-admin`), unless `env` sets `CPM2_ALLOW_LOCAL_ADMIN=0`.

    The prompt store and the server's log (shown when it fails to start) live under `workdir`.
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    full_env = {
        **os.environ,
        "CPM2_PROMPT_STORE": str(workdir / "prompts"),
        "CPM2_ALLOW_LOCAL_ADMIN": "1",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", str(model), "--port", str(port)],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"server exited early:\n{log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server did not become ready:\n{log_path.read_text(errors='replace')}")
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def serve_in_thread(app: Any, *, settings: Settings | None = None, timeout: float = 120) -> Iterator[str]:
    """`app` under uvicorn in a thread, on a loopback socket bound here (no port race); yields its
    base url and stops it (the lifespan drains the engine) on exit. For tests that drive the server
    with real HTTP clients but need no separate process. uvicorn is configured as `cpm2 serve`
    configures it for `settings` (the defaults when None)."""
    config = uvicorn_config(app, (settings or Settings()).model_copy(update={"log_level": "warning"}))
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
