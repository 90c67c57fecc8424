"""One request against the server's limits: oversize bodies (chunked and sized) and maximal inputs.

`python -m bench.abuse` starts `cpm2 serve` as its own process on loopback (`ServerProcess`) and
sends, one at a time, the requests that took a server down before the limits were enforced while
reading: a 50 MB JSON body sent chunked (no Content-Length to check) to every JSON route, 10 MB to
`/tokenize`, a 50 MB Content-Length, and the largest inputs the limits let through (a body just
under `CPM2_PAYLOAD_LIMIT` with `truncate`, which is tokenised in full; a text at the character
bound). For each: the answer and how long it took, how much of the body the client had sent when
the answer came, the server's peak RSS before and after, and `/health` latency measured every
20 ms while the request ran (that is the event loop's responsiveness). JSON in
bench/results/abuse.json.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from bench.serve_load import ServerProcess, ensure_model
from bench.soak import proc_status

MIB = 2**20
RESULTS = Path(__file__).parent / "results"

#: One case's request: sends it and returns (status, MiB of the body sent, the answer's body).
Send = Callable[[], tuple[int, float, bytes]]


def _framing(content_type: str) -> tuple[bytes, bytes, bytes]:
    """(head, filler, tail) of a valid body of the route's kind, as long as the filler repeats: a
    server that reads it all gets a well-formed request of millions of tokens."""
    if content_type.startswith("multipart"):
        head = b'--xyz\r\nContent-Disposition: form-data; name="id"\r\n\r\nbig\r\n--xyz\r\n'
        head += b'Content-Disposition: form-data; name="file"; filename="p.safetensors"\r\n\r\n'
        return head, b"a ", b"\r\n--xyz--\r\n"
    if content_type.endswith("urlencoded"):
        return b"source=en&target=fr&q=", b"a+", b""
    return b'{"inputs": "', b"a ", b'"}'


def send_chunked(url: str, method: str, path: str, content_type: str, total: int) -> tuple[int, int, bytes]:
    """Send a valid body of about `total` bytes chunked, stopping as soon as the server answers;
    returns the status, the body bytes sent before the answer came, and the answer's body."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=60)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    body_head, filler, body_tail = _framing(content_type)
    piece = filler * (8 * 1024)
    pending, sent, finished = b"", 0, False
    sock.setblocking(False)
    while not (finished and not pending):
        readable, writable, _ = select.select([sock], [sock], [], 60)
        if readable:
            break  # the server answered before the body ended
        if not writable:
            raise TimeoutError("the server neither read the body nor answered for 60 s")
        if not pending:
            finished = sent + len(piece) >= total
            data = body_tail if finished else body_head + piece if sent == 0 else piece
            pending = (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + (b"0\r\n\r\n" if finished else b"")
            sent += len(data)
        pending = pending[sock.send(pending) :]
    sock.setblocking(True)
    answer = _read_answer(sock)
    sock.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ")[1]), sent, body


def send_sized_headers(
    url: str, method: str, path: str, length: int, *, content_type: str = "application/json"
) -> tuple[int, bytes]:
    """Headers promising `length` bytes, and no body: answered only by a server that checks first."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=60) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        head, _, body = _read_answer(sock).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _read_answer(sock: socket.socket) -> bytes:
    """The response: headers, then the body to its Content-Length (or to the end of the stream)."""
    answer = bytearray()
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            return bytes(answer)
        answer += data
    expected = answer.index(b"\r\n\r\n") + 4 + _content_length(bytes(answer[: answer.index(b"\r\n\r\n")]))
    while len(answer) < expected:
        data = sock.recv(1 << 20)
        if not data:
            break
        answer += data
    return bytes(answer)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def _peak_rss_mib(pid: int) -> float:
    return proc_status(Path(f"/proc/{pid}")).get("VmHWM", float("nan")) / 1024


class HealthProbe:
    """GET /health every `interval` seconds on its own thread and connection, recording latency."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                client.get(f"{self.url}/health")
                self.latencies.append(time.monotonic() - started)
                self._stop.wait(self.interval)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


@dataclass
class CaseResult:
    case: str
    status: int
    answer_seconds: float
    sent_mib: float
    """Of the body: how much the client had sent when the answer came."""
    peak_rss_before_mib: float
    peak_rss_after_mib: float
    health_probes: int
    health_p50_ms: float
    health_max_ms: float
    detail: str


def _run_case(server: ServerProcess, name: str, send: Send) -> CaseResult:
    pid = server.process.pid
    before = _peak_rss_mib(pid)
    with HealthProbe(server.url) as probe:
        time.sleep(0.1)  # a few probes of the idle server first
        started = time.monotonic()
        status, sent_mib, body = send()
        seconds = time.monotonic() - started
    latencies = probe.latencies or [float("nan")]
    try:
        error = json.loads(body).get("error", "")
        detail = str(error if not isinstance(error, dict) else error.get("message", ""))
    except (json.JSONDecodeError, AttributeError):
        detail = body[:120].decode(errors="replace")
    return CaseResult(
        case=name,
        status=status,
        answer_seconds=seconds,
        sent_mib=sent_mib,
        peak_rss_before_mib=before,
        peak_rss_after_mib=_peak_rss_mib(pid),
        health_probes=len(latencies),
        health_p50_ms=statistics.median(latencies) * 1000,
        health_max_ms=max(latencies) * 1000,
        detail=detail[:160],
    )


def cases(
    url: str, info: dict[str, Any], big_mib: float, payload_limit: int
) -> dict[str, Callable[[], tuple[int, float, bytes]]]:
    """The requests, by name: each returns (status, MiB of body sent, answer body)."""
    total = int(big_mib * MIB)

    def chunked(path: str, size: int, content_type: str = "application/json") -> Send:
        def send() -> tuple[int, float, bytes]:
            status, sent, body = send_chunked(url, "POST", path, content_type, size)
            return status, sent / MIB, body

        return send

    def sized() -> tuple[int, float, bytes]:
        status, body = send_sized_headers(url, "POST", "/generate", total)
        return status, 0.0, body

    def post(path: str, body: dict[str, Any]) -> Send:
        data = json.dumps(body).encode()

        def send() -> tuple[int, float, bytes]:
            r = httpx.post(f"{url}{path}", content=data, headers={"Content-Type": "application/json"}, timeout=300)
            return r.status_code, len(data) / MIB, r.content

        return send

    # The largest text a JSON body under the limit carries (one byte per character); the most
    # characters the server tokenises before refusing; the longest input it accepts ("▁a": a token).
    longest = "a " * ((payload_limit - 200) // 2)
    at_bound = "a " * ((info.get("max_input_chars") or 4000) // 2)
    unit = httpx.post(f"{url}/tokenize", json={"inputs": "a " * 64}, timeout=60).json()["tokens"]
    maximal = "a " * ((info["max_input_tokens"] - 1) * 64 // (len(unit) - 1))  # without its </s>
    upload = info["max_prompt_upload_bytes"] + 2 * MIB
    return {
        f"chunked {big_mib:g} MiB -> /generate": chunked("/generate", total),
        f"chunked {big_mib:g} MiB -> /generate_stream": chunked("/generate_stream", total),
        f"chunked {big_mib:g} MiB -> /v1/completions": chunked("/v1/completions", total),
        f"chunked {big_mib:g} MiB -> /translate (form)": chunked(
            "/translate", total, "application/x-www-form-urlencoded"
        ),
        f"chunked {big_mib / 5:g} MiB -> /tokenize": chunked("/tokenize", total // 5),
        f"chunked {upload / MIB:g} MiB -> /prompts": chunked("/prompts", upload, "multipart/form-data; boundary=xyz"),
        f"Content-Length {big_mib:g} MiB, no body -> /generate": sized,
        "body at the limit, truncate -> /generate": post(
            "/generate", {"inputs": longest, "parameters": {"truncate": 16, "max_new_tokens": 4}}
        ),
        "body at the limit -> /tokenize": post("/tokenize", {"inputs": longest}),
        "text at the character bound -> /tokenize": post("/tokenize", {"inputs": at_bound}),
        "longest accepted input -> /tokenize": post("/tokenize", {"inputs": maximal}),
        "longest accepted input -> /generate": post(
            "/generate", {"inputs": maximal, "parameters": {"max_new_tokens": 8}}
        ),
    }


def run(model: str, *, big_mib: float, payload_limit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cpm2-abuse-") as work:
        server = ServerProcess(ensure_model(model), Path(work) / "prompts", 8, ["--payload-limit", str(payload_limit)])
        try:
            server.wait_ready()
            info = httpx.get(f"{server.url}/info", timeout=30).json()
            results = [
                _run_case(server, name, send) for name, send in cases(server.url, info, big_mib, payload_limit).items()
            ]
            alive = httpx.get(f"{server.url}/health", timeout=30).status_code
        finally:
            server.stop()
    return {
        "machine": machine_info(),
        "model": model,
        "payload_limit": payload_limit,
        "max_input_tokens": info["max_input_tokens"],
        "max_input_chars": info.get("max_input_chars"),
        "health_after": alive,
        "cases": [asdict(r) for r in results],
    }


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"one request at the limits (payload limit {report['payload_limit']} B, {report['model']})")
    for column in ("case", "status", "answer s", "body sent MiB", "peak RSS MiB", "/health p50 / max ms"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for c in report["cases"]:
        table.add_row(
            c["case"],
            str(c["status"]),
            f"{c['answer_seconds']:.3f}",
            f"{c['sent_mib']:.2f}",
            f"{c['peak_rss_before_mib']:.0f} -> {c['peak_rss_after_mib']:.0f}",
            f"{c['health_p50_ms']:.1f} / {c['health_max_ms']:.1f}",
        )
    console.print(table)
    console.print(f"/health after all cases: {report['health_after']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:tiny", help="model directory or builtin:tiny")
    parser.add_argument("--mib", type=float, default=50.0, help="size of the oversize bodies")
    parser.add_argument("--payload-limit", type=int, default=2_000_000, help="the server's CPM2_PAYLOAD_LIMIT")
    parser.add_argument("--out", type=Path, default=RESULTS / "abuse.json")
    args = parser.parse_args(argv)
    report = run(args.model, big_mib=args.mib, payload_limit=args.payload_limit)
    publish(report, out=args.out, plot=None, show=show, draw=lambda _r, _p: None, width=160)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
