"""Overload and disconnects: a real server at 4x its capacity, and streams dropped mid-generation.

    python -m bench.overload            # ~1 min on 2 cores (tiny model)
    python -m bench.overload --quick    # shorter; writes overload.quick.json

`python -m server` runs on 127.0.0.1 with small limits (`--max-batch-size 8 --max-queue-requests 2`:
capacity 10 requests; a queue shorter than the batch is how a latency-bound deployment is sized: an
admitted request waits at most part of one generation). First one client sends requests back to back
(the unloaded latency), then 4 x capacity = 40 clients do so for `--seconds`, half over `/generate`,
half over `/generate_stream`. A refused request (429) is retried after 50-150 ms (seeded jitter), so
the offered load stays near 40 in flight (a client honouring `Retry-After: 1` would offer much less)
and the load generator, on the same 2 cores, does not spin on refusals. Every request generates exactly `--new-tokens`
tokens greedily (`ignore_eos`) from one of a few inputs, so an admitted answer is checked against
the text the same input gets alone.

Reported: 429 latency (send to refusal) p50/p99, admitted latency p50/p99 loaded vs unloaded at the
same `max_new_tokens` (target: loaded p99 <= 2 x unloaded p99), the server's RSS before and after
the load, and a disconnect probe: a stream of 400 tokens closed after 5 events, with the engine's
steps counted from `/metrics` (only that request runs, so steps = its tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info
from bench.serve_load import ServerProcess

INPUTS = ["北京是中国的首都，", "The quick brown fox", "四千零九十六减去一千等于", "Question: what is 2 + 3?"]
RETRY_PAUSE = (0.05, 0.15)


@dataclass
class OverloadRecord:
    """What one load phase saw, per outcome."""

    ok_seconds: list[float] = field(default_factory=list)
    refused_seconds: list[float] = field(default_factory=list)
    status_counts: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Anything functionally wrong: a 429 without Retry-After or the error shape, a 5xx, a wrong text."""
    last_retry_after: float = 1.0
    """The server's last `Retry-After`, in seconds."""


@contextmanager
def running_server(
    model: str, workdir: Path, *, max_batch_size: int, max_queue_requests: int
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m server` with these limits; yields (process, url) once /ready says 200."""
    server = ServerProcess(
        model,
        workdir / "prompts",
        max_batch_size,
        ["--max-queue-requests", str(max_queue_requests)],  # after ServerProcess's own: this one wins
        log=workdir / "server.log",
    )
    try:
        server.wait_ready(timeout=180)
        yield server.process, server.url
    finally:
        server.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def body(text: str, new_tokens: int) -> dict[str, object]:
    return {"inputs": text, "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}


async def references(url: str, new_tokens: int) -> dict[str, str]:
    """Each input's text, generated alone."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return {t: (await client.post("/generate", json=body(t, new_tokens))).json()["generated_text"] for t in INPUTS}


async def _one(
    client: httpx.AsyncClient, *, stream: bool, text: str, new_tokens: int, expected: str, record: OverloadRecord
) -> bool:
    """One request; True if it was admitted (whatever became of it)."""
    begin = time.perf_counter()
    route = "/generate_stream" if stream else "/generate"
    async with client.stream("POST", route, json=body(text, new_tokens)) as response:
        if response.status_code != 200:
            payload = await response.aread()
            seconds = time.perf_counter() - begin
            record.status_counts[response.status_code] = record.status_counts.get(response.status_code, 0) + 1
            if response.status_code == 429:
                record.refused_seconds.append(seconds)
                shape = json.loads(payload)
                record.last_retry_after = float(response.headers.get("Retry-After", "1"))
                if "Retry-After" not in response.headers or shape.get("error_type") != "overloaded":
                    record.problems.append(f"429 without Retry-After or error shape: {response.headers} {shape}")
                return False
            record.problems.append(f"{route}: {response.status_code} {payload[:200]!r}")
            return True
        if stream:
            events = [json.loads(line[5:]) async for line in response.aiter_lines() if line.startswith("data:")]
            final = events[-1] if events else {}
            text_out = final.get("generated_text")
            if "error" in final:
                record.problems.append(f"stream failed: {final}")
        else:
            text_out = json.loads(await response.aread()).get("generated_text")
    seconds = time.perf_counter() - begin
    record.status_counts[200] = record.status_counts.get(200, 0) + 1
    record.ok_seconds.append(seconds)
    if text_out != expected:
        record.problems.append(f"{route}: incomplete or wrong text {text_out!r}, expected {expected!r}")
    return True


async def load(
    url: str,
    *,
    clients: int,
    seconds: float,
    new_tokens: int,
    expected: dict[str, str],
    requests: int | None = None,
    honour_retry_after: bool = False,
) -> OverloadRecord:
    """`clients` closed-loop clients for `seconds` (or until each got `requests` admitted)."""
    record = OverloadRecord()
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        jitter = random.Random(i)
        admitted, n = 0, 0
        while time.monotonic() < stop_at and (requests is None or admitted < requests):
            text = INPUTS[(i + n) % len(INPUTS)]
            n += 1
            if await _one(
                client, stream=i % 2 == 1, text=text, new_tokens=new_tokens, expected=expected[text], record=record
            ):
                admitted += 1
            elif honour_retry_after:
                await asyncio.sleep(jitter.uniform(0.5, 1.5) * record.last_retry_after)
            else:
                await asyncio.sleep(jitter.uniform(*RETRY_PAUSE))

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return record


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def disconnect_probe(url: str, *, new_tokens: int = 400, read_events: int = 5) -> dict[str, float]:
    """Close a stream after `read_events` events; count the engine steps the request ran in all.

    Run on an otherwise idle server: every decode step then belongs to this request (one token each).
    """
    with httpx.Client(base_url=url, timeout=60) as client:
        before = client.get("/metrics").text
        steps_before = metric(before, "cpm2_engine_steps_total")
        cancelled_before = metric(before, "cpm2_requests_cancelled_total")
        with client.stream("POST", "/generate_stream", json=body("a long one", new_tokens)) as response:
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == read_events:
                        break
        closed = time.perf_counter()
        deadline = time.monotonic() + 10
        while True:
            now = client.get("/metrics").text
            if metric(now, "cpm2_requests_cancelled_total") > cancelled_before or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        noticed = time.perf_counter() - closed
        time.sleep(0.3)  # had it kept running, it would have stepped again by now
        later = client.get("/metrics").text
    steps = metric(now, "cpm2_engine_steps_total") - steps_before
    return {
        "max_new_tokens": new_tokens,
        "events_read": read_events,
        "cancelled": metric(now, "cpm2_requests_cancelled_total") - cancelled_before,
        "steps_run": steps,
        "steps_after_last_read_event": steps - read_events,
        "steps_after_cancel": metric(later, "cpm2_engine_steps_total") - metric(now, "cpm2_engine_steps_total"),
        "cancel_seen_ms": noticed * 1000,
        "running_after": metric(later, "cpm2_requests_running"),
    }


def _p(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-requests", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--baseline-requests", type=int, default=100)
    parser.add_argument(
        "--honour-retry-after",
        action="store_true",
        help="refused clients wait Retry-After (x0.5-1.5) as TGI/OpenAI clients do, instead of 50-150 ms",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.baseline_requests = 8.0, 15
    out = args.out or Path("bench/results") / ("overload.quick.json" if args.quick else "overload.json")
    capacity = args.max_batch_size + args.max_queue_requests
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(
            args.model, Path(tmp), max_batch_size=args.max_batch_size, max_queue_requests=args.max_queue_requests
        ) as (process, url),
    ):
        expected = asyncio.run(references(url, args.new_tokens))
        unloaded = asyncio.run(
            load(
                url,
                clients=1,
                seconds=600,
                new_tokens=args.new_tokens,
                expected=expected,
                requests=args.baseline_requests,
            )
        )
        # Exactly `max_batch_size` clients: full batches, no queue, no refusals. Separates what a full
        # batch costs (the model) from what overload handling adds (the server).
        at_capacity = asyncio.run(
            load(
                url,
                clients=args.max_batch_size,
                seconds=args.seconds / 2,
                new_tokens=args.new_tokens,
                expected=expected,
            )
        )
        rss_before = rss_bytes(process.pid)
        loaded = asyncio.run(
            load(
                url,
                clients=4 * capacity,
                seconds=args.seconds,
                new_tokens=args.new_tokens,
                expected=expected,
                honour_retry_after=args.honour_retry_after,
            )
        )
        time.sleep(1.0)  # let the last responses' buffers go
        rss_after = rss_bytes(process.pid)
        probe = disconnect_probe(url)
    result = {
        "machine": machine_info(),
        "model": args.model,
        "max_batch_size": args.max_batch_size,
        "max_queue_requests": args.max_queue_requests,
        "clients": 4 * capacity,
        "new_tokens": args.new_tokens,
        "seconds": args.seconds,
        "unloaded": asdict(unloaded),
        "loaded": asdict(loaded),
        "refused_ms": {"p50": _p(loaded.refused_seconds, 50), "p99": _p(loaded.refused_seconds, 99)},
        "admitted_ms": {"p50": _p(loaded.ok_seconds, 50), "p99": _p(loaded.ok_seconds, 99)},
        "unloaded_ms": {"p50": _p(unloaded.ok_seconds, 50), "p99": _p(unloaded.ok_seconds, 99)},
        "at_capacity": asdict(at_capacity),
        "at_capacity_ms": {"p50": _p(at_capacity.ok_seconds, 50), "p99": _p(at_capacity.ok_seconds, 99)},
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "disconnect": probe,
    }
    result["p99_ratio"] = result["admitted_ms"]["p99"] / result["unloaded_ms"]["p99"]
    result["p99_ratio_vs_full_batch"] = result["admitted_ms"]["p99"] / result["at_capacity_ms"]["p99"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))

    table = Table(
        title=f"overload: {4 * capacity} clients vs capacity {capacity} ({args.model}, {args.new_tokens} tokens)"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    counts = ", ".join(f"{code}: {n}" for code, n in sorted(loaded.status_counts.items()))
    table.add_row("responses under load", counts)
    table.add_row("429 latency p50 / p99 ms", "{p50:.1f} / {p99:.1f}".format(**result["refused_ms"]))
    table.add_row("admitted p50 / p99 ms (loaded)", "{p50:.0f} / {p99:.0f}".format(**result["admitted_ms"]))
    table.add_row("admitted p50 / p99 ms (unloaded)", "{p50:.0f} / {p99:.0f}".format(**result["unloaded_ms"]))
    table.add_row(
        f"admitted p50 / p99 ms ({args.max_batch_size} clients: full batch)",
        "{p50:.0f} / {p99:.0f}".format(**result["at_capacity_ms"]),
    )
    table.add_row("p99 loaded / unloaded (target <= 2)", f"{result['p99_ratio']:.2f}")
    table.add_row("p99 loaded / full batch (what overload adds)", f"{result['p99_ratio_vs_full_batch']:.2f}")
    table.add_row("RSS before -> after MiB", f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f}")
    table.add_row("functional problems", str(len(loaded.problems) + len(unloaded.problems) + len(at_capacity.problems)))
    table.add_row("disconnect: events read / steps run", f"{probe['events_read']} / {probe['steps_run']:.0f}")
    table.add_row("disconnect: steps after cancel", f"{probe['steps_after_cancel']:.0f}")
    Console().print(table)
    print(f"wrote {out}")
    return 0 if not loaded.problems and not unloaded.problems else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
