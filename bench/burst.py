"""Bursts of concurrent requests of varied shapes against a real server: does its memory level off?

    python -m bench.burst                  # 10 bursts x 64 requests, the `small` preset (~9 min on 2 cores)
    python -m bench.burst --quick          # 3 bursts x 24 requests; writes burst.quick.json
    python -m bench.burst --concurrency 200  # the hardening issue's 200 (~26 min on 2 cores)
    python -m bench.burst --model builtin:tiny --bursts 4 --concurrency 50

The server runs as its own process on loopback (`bench.serve_load.ServerProcess`, by default the
`small` preset the soak uses), with `--max-concurrent-requests` and `--max-queue-requests` above the
burst so that nothing is refused for load. `bench.soak` runs a steady mix for a long time; this sends
the whole burst at once, `--bursts` times, each request of a shape drawn from its own seeded RNG.
The default burst is 64 requests, twice the batch (so half of every burst queues): a burst of 200
took 153 s on a 2-core machine, encoding the long inputs most of it, so 10 of them would take 26 min.

- route: /generate, /generate_stream, /v1/completions (plain and streamed), /tokenize;
- input: 1 character up to `max_input_tokens` (from /info) worth, a fifth of them maximal. The
  lengths are a ladder of prefixes of one text whose token counts /tokenize measured first, so every
  one is known to fit, soft prompt's virtual tokens included;
- `max_new_tokens` 1-64, greedy or sampled, `num_beams` 2 on some greedy TGI requests, stop
  sequences on some, one of five shared soft prompts (prefix, infix, suffix, all four positions,
  and a 256-token prefix) on some;
- per burst a few requests that must be refused while the rest run: an input over the server's
  character bound (422, refused before tokenising) and a body over `--payload-limit` sent chunked,
  with no Content-Length (413, refused while it is read).

Every response is counted by (kind, status). An error is a status other than the expected one (a 5xx,
a 429), a transport error, a stream without its final event or with an error event, or an answer
without the field its API promises. While a burst runs, a thread GETs /health every 50 ms on its own
connection (a thread, so the load generator's event loop does not delay its clock) and records the
latency. Before the first burst and after each one, once /metrics shows no request in flight, the
server's RSS (VmRSS, and its anonymous part: the memory-mapped weights are file-backed) and open
descriptors are sampled.

Verdict: RSS growth over the second half of the bursts against the first half; `levels_off` when the
second half grew less than `LEVEL_OFF_FRACTION` of the RSS after the first burst. The exit status is 1
on any error or a server log ERROR, never on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from bench.serve_load import CACHE, INPUTS, ServerProcess, ensure_model
from bench.soak import log_problems, parse_metrics, probe
from bench.soak_mix import SHARED_PROMPTS, read_events, upload_shared_prompts
from engine.prompts import SoftPrompt

#: RSS may still grow this much (a fraction of the RSS after the first burst) over the second half of
#: the bursts and count as levelled off: allocator arenas and caches keep settling for a few bursts
#: after the first one has set the high-water mark, and that settling stays under a few per cent,
#: while a per-request leak grows linearly with the requests served and crosses it.
LEVEL_OFF_FRACTION = 0.05
#: Relative frequency of each valid kind of request.
KINDS: dict[str, int] = {
    "generate": 30,
    "generate_stream": 25,
    "completions": 15,
    "completions_stream": 10,
    "tokenize": 10,
}
#: The field a non-streamed 200 answer of each route must have.
ANSWER_KEY = {"/generate": "generated_text", "/v1/completions": "choices", "/tokenize": "tokens"}
LONG_PROMPT = "burst-long"
LONG_PROMPT_TOKENS = 256
HEALTH_EVERY_S = 0.05
MAXIMAL_SHARE = 0.2


@dataclass(frozen=True)
class Shot:
    """One request of a burst and the status it must get."""

    kind: str
    path: str
    body: dict[str, Any] | None = None
    chunked_bytes: int = 0
    """When set, a body of this many bytes sent chunked (no Content-Length) instead of `body`."""
    expected: int = 200
    features: tuple[str, ...] = ()


@dataclass
class BurstResult:
    """What one burst saw, and the server's state once it was idle again."""

    burst: int
    requests: int
    wall_s: float
    statuses: dict[str, dict[str, int]]
    """kind -> status -> responses (status 0: a transport error)."""
    num_errors: int
    num_refused: int
    health_ms: dict[str, float]
    health_failures: int
    idle: dict[str, float] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rung:
    """A prefix of the input text: its characters and its tokens as /tokenize counts them."""

    chars: int
    tokens: int


class Inputs:
    """Prefixes of one text with known token counts, from 1 character to what fits each budget."""

    def __init__(self, url: str, *, max_input_tokens: int, virtual: dict[str | None, int]) -> None:
        text = "".join(INPUTS)
        self.text = text * (4 * max_input_tokens // len(text) + 1)
        self.virtual = virtual
        with httpx.Client(base_url=url, timeout=60) as client:
            self.maximal = {p: self._longest(client, max_input_tokens - v) for p, v in virtual.items()}
            lengths = {1, *(round(1.4**i) for i in range(1, 40) if 1.4**i < self.maximal[None].chars)}
            measured = {self._measure(client, n) for n in lengths}
        self.rungs = sorted(measured | set(self.maximal.values()), key=lambda r: r.chars)

    def _measure(self, client: httpx.Client, chars: int) -> Rung:
        r = client.post("/tokenize", json={"inputs": self.text[:chars]})
        # 422: over max_input_tokens (or the character bound), so more than any budget.
        return Rung(chars, len(r.json()["tokens"]) if r.status_code == 200 else 1 << 30)

    def _longest(self, client: httpx.Client, budget: int) -> Rung:
        lo, hi = 1, len(self.text)
        while lo < hi:  # the longest prefix of at most `budget` tokens
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._measure(client, mid).tokens <= budget else (lo, mid - 1)
        return self._measure(client, lo)

    def draw(self, rng: random.Random, prompt_id: str | None) -> tuple[str, bool]:
        """An input that fits with `prompt_id`'s virtual tokens, and whether it is the longest that does."""
        longest = self.maximal[prompt_id]
        if rng.random() < MAXIMAL_SHARE:
            return self.text[: longest.chars], True
        rung = rng.choice([r for r in self.rungs if r.tokens <= longest.tokens])
        return self.text[: rung.chars], rung == longest


def upload_prompts(url: str, d_model: int) -> dict[str | None, int]:
    """The soak's shared prompts and a long prefix; each id's virtual encoder tokens (None: no prompt)."""
    upload_shared_prompts(url, d_model)
    generator = torch.Generator().manual_seed(1)
    data = SoftPrompt(prefix=torch.randn(LONG_PROMPT_TOKENS, d_model, generator=generator) * 0.5).to_bytes()
    files = {"file": ("p.safetensors", data)}
    r = httpx.post(f"{url}/prompts", files=files, data={"id": LONG_PROMPT}, timeout=60)
    r.raise_for_status()
    virtual: dict[str | None, int] = {None: 0}
    for prompt_id in (*SHARED_PROMPTS, LONG_PROMPT):
        answer = httpx.post(f"{url}/tokenize", json={"inputs": "a", "prompt_id": prompt_id}, timeout=60).json()
        virtual[prompt_id] = answer["input_length"] - len(answer["tokens"])
    return virtual


def draw_shot(rng: random.Random, inputs: Inputs, model_name: str) -> Shot:
    """One valid request of a shape drawn from `rng`."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    prompt_id = rng.choice([*SHARED_PROMPTS, LONG_PROMPT]) if rng.random() < 0.3 else None
    text, is_maximal = inputs.draw(rng, prompt_id)
    features = [f"prompt:{prompt_id}"] if prompt_id else []
    features += ["maximal"] if is_maximal else []
    if kind == "tokenize":
        body: dict[str, Any] = {"inputs": text} | ({"prompt_id": prompt_id} if prompt_id else {})
        return Shot(kind, "/tokenize", body, features=tuple(features))
    new_tokens = rng.randint(1, 64)
    is_sampled = rng.random() < 0.5
    stop = [rng.choice(("。", "，", "the", "\n"))] if rng.random() < 0.2 else []
    features += ["sampled" if is_sampled else "greedy"] + (["stop"] if stop else [])
    sampling: dict[str, Any] = {}
    if is_sampled:
        sampling = {"temperature": rng.choice((0.7, 1.0, 1.3)), "seed": rng.randrange(2**31)}
        sampling |= rng.choice(({"top_k": 20}, {"top_p": 0.9}, {}))
    if kind.startswith("completions"):
        body = {"model": prompt_id or model_name, "prompt": text, "max_tokens": new_tokens, **sampling}
        body |= ({"stop": stop} if stop else {}) | ({"stream": True} if kind.endswith("stream") else {})
        return Shot(kind, "/v1/completions", body, features=(*features, f"new_tokens:{new_tokens}"))
    parameters: dict[str, Any] = {"max_new_tokens": new_tokens, "stop": stop, **sampling}
    parameters |= {"do_sample": True} if is_sampled else {"ignore_eos": rng.random() < 0.5}
    if not is_sampled and rng.random() < 0.1:  # beam search runs a request alone on the engine thread
        parameters["num_beams"] = 2
        features.append("beams")
    parameters |= {"prompt_id": prompt_id} if prompt_id else {}
    parameters |= {"details": True} if rng.random() < 0.3 else {}
    return Shot(
        kind, f"/{kind}", {"inputs": text, "parameters": parameters}, features=(*features, f"new_tokens:{new_tokens}")
    )


def refused_shots(rng: random.Random, *, num: int, payload_limit: int) -> list[Shot]:
    """`num` requests the server must refuse: an input over its character bound (within the body
    limit: refused before tokenising), and a body over the limit sent chunked (refused while read)."""
    shots = []
    for i in range(num):
        path = rng.choice(("/generate", "/generate_stream", "/tokenize"))
        if i % 2 == 0:
            # ASCII, so the body is about as many bytes as characters: just under the body limit.
            body = {"inputs": "x" * (payload_limit - 256)}
            shots.append(Shot("over_chars", path, body, expected=422))
        else:
            shots.append(Shot("over_payload_chunked", path, chunked_bytes=payload_limit + 65536, expected=413))
    return shots


async def _chunks(num_bytes: int) -> AsyncIterator[bytes]:
    # JSON whitespace; an async iterator makes httpx send it with Transfer-Encoding: chunked.
    for start in range(0, num_bytes, 65536):
        yield b" " * min(65536, num_bytes - start)


async def send(client: httpx.AsyncClient, shot: Shot) -> tuple[int, str | None]:
    """(status, error or None); status 0 for a transport error."""
    if shot.chunked_bytes:
        request: dict[str, Any] = {"content": _chunks(shot.chunked_bytes)}
        request["headers"] = {"content-type": "application/json"}
    else:
        request = {"json": shot.body}
    is_stream = shot.kind.endswith("stream") and shot.expected == 200
    where = f"{shot.kind} {shot.path}"
    try:
        async with client.stream("POST", shot.path, **request) as response:
            status = response.status_code
            if status != shot.expected:
                return status, f"{where}: {status}, expected {shot.expected}: {(await response.aread())[:200]!r}"
            if is_stream:
                return status, await read_events(response, where, is_openai=shot.path.startswith("/v1/"))
            payload = json.loads(await response.aread())
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return 0, f"{where}: {type(exc).__name__} {exc}"
    key = ANSWER_KEY[shot.path] if status == 200 else "error"
    return status, None if key in payload else f"{where}: the answer has no `{key}`: {str(payload)[:200]}"


def _probe_health(url: str, stop: threading.Event, latencies: list[float], failures: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:  # at least once, however short the burst
            started = time.perf_counter()
            try:
                status = client.get("/health").status_code
                if status != 200:
                    failures.append(f"/health: {status}")
            except httpx.HTTPError as exc:
                failures.append(f"/health: {type(exc).__name__} {exc}")
            latencies.append(time.perf_counter() - started)
            if stop.wait(HEALTH_EVERY_S):
                return


async def _fire(url: str, shots: list[Shot]) -> list[tuple[int, str | None]]:
    limits = httpx.Limits(max_connections=len(shots) + 4, max_keepalive_connections=len(shots) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(send(client, shot) for shot in shots))


def run_burst(url: str, burst: int, shots: list[Shot]) -> BurstResult:
    """Send every shot at once while probing /health; count the answers."""
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    prober = threading.Thread(target=_probe_health, args=(url, stop, latencies, failures), daemon=True)
    prober.start()
    started = time.monotonic()
    answers = asyncio.run(_fire(url, shots))
    wall = time.monotonic() - started
    stop.set()
    prober.join()
    statuses: dict[str, Counter[str]] = {}
    for shot, (status, _) in zip(shots, answers, strict=True):
        statuses.setdefault(shot.kind, Counter())[str(status)] += 1
    errors = [error for _, error in answers if error is not None] + failures
    return BurstResult(
        burst=burst,
        requests=len(shots),
        wall_s=wall,
        statuses={kind: dict(counts) for kind, counts in statuses.items()},
        num_errors=len(errors),
        num_refused=sum(s.expected >= 400 for s, (_, e) in zip(shots, answers, strict=True) if e is None),
        health_ms=_summary_ms(latencies),
        health_failures=len(failures),
        error_examples=errors[:5],
    )


def _summary_ms(seconds: list[float]) -> dict[str, float]:
    if len(seconds) < 2:
        return {"n": len(seconds), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"n": len(seconds), "p50": q[49] * 1000, "p99": q[98] * 1000, "max": max(seconds) * 1000}


def sample_idle(url: str, pid: int, timeout: float = 120) -> dict[str, float]:
    """The server's RSS and descriptors once no request is in flight, running or waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        busy = sum(metrics.get(f"cpm2_requests_{n}", 0.0) for n in ("in_flight", "running", "waiting"))
        if busy == 0:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # closed connections and finished requests' buffers go
    return probe(pid)


def verdict(rss_mib: list[float]) -> dict[str, Any]:
    """`rss_mib[0]` before the first burst, then one sample after each: first-half vs second-half growth."""
    after = rss_mib[1:]
    if len(after) < 2:
        return {"levels_off": None, "reason": "needs at least 2 bursts"}
    half = len(after) // 2
    first, second = after[half - 1] - rss_mib[0], after[-1] - after[half - 1]
    threshold = LEVEL_OFF_FRACTION * after[0]
    return {
        "first_half_growth_mib": first,
        "second_half_growth_mib": second,
        "second_half_growth_pct_of_first_burst": 100 * second / after[0],
        "threshold_mib": threshold,
        "threshold_pct": 100 * LEVEL_OFF_FRACTION,
        "levels_off": second < threshold,
    }


def shapes(shots: list[Shot]) -> dict[str, Any]:
    """How varied the requests were: kinds, features, input characters, new tokens."""
    features = Counter(f for shot in shots for f in shot.features if not f.startswith("new_tokens:"))
    new_tokens = [int(f.split(":")[1]) for shot in shots for f in shot.features if f.startswith("new_tokens:")]
    valid = [shot.body for shot in shots if shot.body is not None and shot.expected == 200]
    chars = [len(body.get("inputs") or body.get("prompt") or "") for body in valid]
    return {
        "kinds": dict(Counter(shot.kind for shot in shots)),
        "features": dict(sorted(features.items())),
        "input_chars": {"min": min(chars), "max": max(chars)},
        "new_tokens": {"min": min(new_tokens, default=0), "max": max(new_tokens, default=0)},
    }


def show(report: dict[str, Any], console: Console) -> None:
    """One row per burst, then the verdict."""
    table = Table(title=report["title"])
    for name in ("burst", "requests", "errors", "refused by status", "wall s", "RSS MiB", "anon MiB", "fds"):
        table.add_column(name, justify="right")
    table.add_column("/health p50 / p99 / max ms", justify="right")
    before = report["rss_series_mib"][0]
    table.add_row("before", "", "", "", "", f"{before:.0f}", f"{report['idle_before']['rss_anon_mib']:.0f}")
    for row in report["bursts"]:
        refused = Counter[str]()
        for kind, counts in row["statuses"].items():
            if kind.startswith("over_"):
                refused.update(counts)
        health = row["health_ms"]
        table.add_row(
            str(row["burst"]),
            str(row["requests"]),
            str(row["num_errors"]),
            ", ".join(f"{status}: {n}" for status, n in sorted(refused.items())),
            f"{row['wall_s']:.1f}",
            f"{row['idle']['rss_mib']:.0f}",
            f"{row['idle']['rss_anon_mib']:.0f}",
            f"{row['idle']['fds']:.0f}",
            f"{health['p50']:.1f} / {health['p99']:.1f} / {health['max']:.1f}",
        )
    console.print(table)
    v = report["verdict"]
    if v["levels_off"] is not None:
        console.print(
            f"RSS growth: first half {v['first_half_growth_mib']:+.1f} MiB, second half "
            f"{v['second_half_growth_mib']:+.1f} MiB ({v['second_half_growth_pct_of_first_burst']:+.2f} % of the RSS "
            f"after burst 1; threshold {v['threshold_pct']:.0f} %): levels_off={v['levels_off']}"
        )
    console.print(
        f"{report['num_requests']} requests, {report['num_errors']} errors, "
        f"{report['num_server_log_problems']} server log problems, {report['wall_s']:.0f} s"
    )
    for example in report["error_examples"] + report["server_log_examples"]:
        console.print("error:", example, markup=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="preset name (built once), directory, or builtin:tiny")
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64, help="valid requests sent at once per burst")
    parser.add_argument("--refused-per-burst", type=int, default=4, help="oversize requests added to each burst")
    parser.add_argument("--payload-limit", type=int, default=2_000_000, help="the server's JSON body limit, bytes")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="more `cpm2 serve` flags")
    parser.add_argument("--quick", action="store_true", help="3 bursts x 24 requests")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/burst[.quick].json")
    parser.add_argument("--work-dir", type=Path, default=CACHE / "burst", help="the prompt store and the server log")
    args = parser.parse_args(argv)
    if args.quick:
        args.bursts, args.concurrency = 3, 24
    out = args.out or Path("bench/results") / ("burst.quick.json" if args.quick else "burst.json")
    model = ensure_model(args.model)
    store, log = args.work_dir / "prompts", args.work_dir / "server.log"
    shutil.rmtree(store, ignore_errors=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    limit = str(max(512, args.concurrency + args.refused_per_burst + 16))
    extra = ["--max-concurrent-requests", limit, "--max-queue-requests", limit]
    extra += ["--payload-limit", str(args.payload_limit), *shlex.split(args.server_args)]
    server = ServerProcess(model, store, args.max_batch_size, extra, log=log)
    console = Console(width=160)
    results: list[BurstResult] = []
    all_shots: list[Shot] = []
    try:
        server.wait_ready()
        pid = server.process.pid
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        inputs = Inputs(
            server.url, max_input_tokens=info["max_input_tokens"], virtual=upload_prompts(server.url, info["d_model"])
        )
        idle_before = sample_idle(server.url, pid)
        started = time.monotonic()
        for burst in range(1, args.bursts + 1):
            rngs = [random.Random(f"{args.seed}-{burst}-{i}") for i in range(args.concurrency)]
            shots = [draw_shot(rng, inputs, info["model_id"]) for rng in rngs]
            shots += refused_shots(
                random.Random(f"{args.seed}-{burst}-refused"),
                num=args.refused_per_burst,
                payload_limit=args.payload_limit,
            )
            all_shots += shots
            result = run_burst(server.url, burst, shots)
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {server.process.returncode} during burst {burst}; see {log}"
                )
            result.idle = sample_idle(server.url, pid)
            results.append(result)
            console.print(
                f"burst {burst}: {result.requests} requests, {result.num_errors} errors, {result.wall_s:.1f} s, "
                f"RSS {result.idle['rss_mib']:.0f} MiB"
            )
        wall = time.monotonic() - started
    finally:
        server.stop()
    problems = log_problems(log)
    rss = [idle_before["rss_mib"], *(r.idle["rss_mib"] for r in results)]
    report: dict[str, Any] = {
        "benchmark": "burst",
        "title": f"cpm2 bursts — {info['model_id']} ({info['dtype']}), {args.bursts} x {args.concurrency} concurrent "
        f"+ {args.refused_per_burst} oversize",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "server": info,
        "virtual_tokens": {str(k): v for k, v in inputs.virtual.items()},
        "input_ladder": [asdict(r) for r in inputs.rungs],
        "shapes": shapes(all_shots),
        "num_requests": sum(r.requests for r in results),
        "num_errors": sum(r.num_errors for r in results),
        "wall_s": wall,
        "rss_series_mib": rss,
        "rss_anon_series_mib": [idle_before["rss_anon_mib"], *(r.idle["rss_anon_mib"] for r in results)],
        "fds_series": [idle_before["fds"], *(r.idle["fds"] for r in results)],
        "verdict": verdict(rss),
        "idle_before": idle_before,
        "bursts": [asdict(r) for r in results],
        "error_examples": [e for r in results for e in r.error_examples][:10],
        "num_server_log_problems": len(problems),
        "server_log_examples": problems[:10],
        "server_exit_status": server.process.returncode,
    }
    publish(report, out=out, plot=None, show=show, draw=lambda *_: None, width=160)
    return 0 if report["num_errors"] == 0 and not problems else 1


if __name__ == "__main__":
    # `kill` of a run in the background (where SIGINT is ignored) still stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
