"""The HTTP server under load: a bounded loopback load generator, one soft prompt vs 8 mixed.

    python -m bench.serve_load              # full run (~10 min on 2 cores)
    python -m bench.serve_load --quick      # concurrency 1 and 4, fewer requests
    python -m bench.serve_load --model builtin:tiny

`cpm2 serve` runs as its own process on 127.0.0.1 (here: the `small` preset, CPM-2 architecture,
6 + 6 layers, d_model 512, 16 experts in every block, float32, written once under
`.cache/bench/`). Eight soft prompts of 100 virtual tokens each (SEED.md's prompt length) are
uploaded through `/prompts`. For each concurrency C, C clients each stream requests back to back
over `/generate_stream` (closed loop: a client sends its next request when the last one ends)
until `requests_per_client × C` are done. Every request generates exactly `new_tokens` tokens
(`ignore_eos`, greedy) from a short input, so the work per request is fixed.

Scenarios at each C, run A B C C B A: **one prompt** (every request uses prompt 0), **8 mixed**
(request i uses prompt i mod 8, eight different tensors) and **8 ids, same tensors** (eight ids
holding prompt 0's tensors). The last one separates what mixing costs the server (lookups,
batch assembly) from what it costs the model: an MoE model routes the rows of a batch with
different prompts to more distinct experts, so its decode step reads more expert weights.

Reported: aggregate generated tok/s (tokens ÷ wall time from the first request sent to the last
one finished), time to first token and inter-token latency percentiles as the client sees them,
and from the server's `/metrics`: mean decode batch size, distinct prompts per batch, mean decode
step time, and the share of wall time spent encoding new requests. Targets: 16 concurrent ≥ 8×
the single-client aggregate tok/s; 8 mixed prompts ≥ 0.95× one prompt. Next to the first, the
decode-step bound 16 × step(C=1) ÷ step(C=16): what the model's own step scaling allows. At every
C > 1: the share of that bound (C × step(1) ÷ step(C)) the server reached (target ≥ 0.9), and the
most of it decode steps could reach at the encoding shares measured, (1 − encoding share at C) ÷
(1 − encoding share at 1): encoder passes are work the step bound leaves out.

The load generator shares the machine with the server (it uses a fraction of one core), which
lowers every number a little and the high-concurrency ones most.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info
from bench.plots import save
from engine.prompts import SoftPrompt

CACHE = Path(".cache/bench")
SCENARIOS = ("one prompt", "8 mixed", "8 ids, same tensors")
NUM_PROMPTS = 8
INPUTS = [
    "北京是中国的首都，",
    "The quick brown fox jumps over the lazy dog.",
    "四千零九十六减去一千等于",
    "Translate to English: 今天天气很好。",
    "Question: what is the capital of France? Answer:",
    "一二三四五六七八九十",
]


@dataclass
class RequestRecord:
    ttft: float
    gaps: list[float]
    tokens: int
    seconds: float


@dataclass
class LoadResult:
    concurrency: int
    scenario: str
    requests: int
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    mean_batch_size: float
    mean_distinct_prompts: float
    decode_step_ms: float
    encode_seconds_share: float
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": q[49] * 1000, "p90": q[89] * 1000, "p99": q[98] * 1000}


def ensure_model(spec: str) -> str:
    """A model directory for `spec`: `builtin:…` as is (the server writes it), a preset name built once."""
    if spec.startswith("builtin:") or Path(spec).exists():
        return spec
    target = CACHE / f"serve-{spec}"
    if not (target / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "cpm2", "init", "--preset", spec, "--out", str(target), "--quiet"], check=True
        )
    return str(target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m server` on a free loopback port, ready when `/ready` says so."""

    def __init__(
        self, model: str, store: Path, max_batch_size: int, extra: Sequence[str] = (), *, log: Path | None = None
    ) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        args = ["--model", model, "--port", port, "--prompt-store", str(store), "--log-level", "warning"]
        args += ["--max-batch-size", str(max_batch_size), "--max-concurrent-requests", "512"]
        # Its clients upload and delete prompts from this machine, as under `make serve`.
        args += ["--max-queue-requests", "512", "--allow-local-admin", *extra]
        # A long run logs to `log`: an unread stderr pipe fills up and then blocks the server.
        self.log = log
        command = [sys.executable, "-m", "server", *args]
        if log is None:
            self.process = subprocess.Popen(command, stderr=subprocess.PIPE)
        else:
            with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
                self.process = subprocess.Popen(command, stderr=stderr)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.log is not None:
                    err = self.log.read_text(errors="replace")
                else:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"the server exited:\n{err}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def upload_prompts(url: str, d_model: int, virtual_tokens: int) -> list[str]:
    """`task-0..7` (different random prefixes), then `copy-0..7` (task-0's tensors under 8 ids)."""
    generator = torch.Generator().manual_seed(0)
    tasks = [
        SoftPrompt(prefix=torch.randn(virtual_tokens, d_model, generator=generator) * 0.5).to_bytes()
        for _ in range(NUM_PROMPTS)
    ]
    uploads = [(f"task-{i}", data) for i, data in enumerate(tasks)]
    uploads += [(f"copy-{i}", tasks[0]) for i in range(NUM_PROMPTS)]
    for prompt_id, data in uploads:
        r = httpx.post(f"{url}/prompts", files={"file": ("p.safetensors", data)}, data={"id": prompt_id}, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"upload of {prompt_id} failed: {r.status_code} {r.text}")
    return [prompt_id for prompt_id, _ in uploads]


async def _one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestRecord:
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/generate_stream", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return RequestRecord(ttft=stamps[0] - start, gaps=gaps, tokens=len(stamps), seconds=end - start)


async def run_load(
    url: str, concurrency: int, total: int, prompts: list[str | None], new_tokens: int
) -> tuple[list[RequestRecord], int, float]:
    """`concurrency` closed-loop clients until `total` requests are done: (records, errors, wall s)."""
    counter = iter(range(total))
    records: list[RequestRecord] = []
    errors = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            parameters: dict[str, Any] = {"max_new_tokens": new_tokens, "ignore_eos": True}
            prompt = prompts[i % len(prompts)]
            if prompt is not None:
                parameters["prompt_id"] = prompt
            try:
                records.append(
                    await _one_request(client, {"inputs": INPUTS[i % len(INPUTS)], "parameters": parameters})
                )
            except (RuntimeError, httpx.HTTPError):
                errors += 1

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return records, errors, wall


_SAMPLE = re.compile(
    r"^(cpm2_batch_size|cpm2_batch_distinct_prompts|cpm2_batch_forward_duration_seconds)_(sum|count)"
    r'(?:\{phase="(decode|encode)"\})?\s+(\S+)$'
)


def batch_counters(url: str) -> dict[str, float]:
    """Sums and counts of the server's decode batch-size and distinct-prompt histograms."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            phase = f"_{match[3]}" if match[3] else ""
            out[f"{match[1]}{phase}_{match[2]}"] = float(match[4])
    return out


@dataclass
class Run:
    records: list[RequestRecord]
    errors: int
    wall: float
    counters_before: dict[str, float]
    counters_after: dict[str, float]


def run_once(url: str, concurrency: int, scenario: str, prompt_ids: list[str], args: argparse.Namespace) -> Run:
    if scenario == "one prompt":
        prompts: list[str | None] = [prompt_ids[0]]
    elif scenario == "8 mixed":
        prompts = list(prompt_ids[:NUM_PROMPTS])
    else:
        prompts = list(prompt_ids[NUM_PROMPTS:])
    before = batch_counters(url)
    total = max(args.min_requests, args.requests_per_client * concurrency)
    records, errors, wall = asyncio.run(run_load(url, concurrency, total, prompts, args.new_tokens))
    return Run(records, errors, wall, before, batch_counters(url))


def combine(concurrency: int, scenario: str, runs: list[Run]) -> LoadResult:
    """One result from the rounds of a scenario: all their requests, total tokens over total time."""
    records = [r for run in runs for r in run.records]
    tokens = sum(r.tokens for r in records)
    wall = sum(run.wall for run in runs)

    def mean_of(name: str) -> float:
        total = sum(
            run.counters_after.get(f"{name}_sum", 0.0) - run.counters_before.get(f"{name}_sum", 0.0) for run in runs
        )
        count = sum(
            run.counters_after.get(f"{name}_count", 0.0) - run.counters_before.get(f"{name}_count", 0.0) for run in runs
        )
        return total / count if count else float("nan")

    def encode_share() -> float:
        name = "cpm2_batch_forward_duration_seconds_encode_sum"
        return sum(run.counters_after.get(name, 0.0) - run.counters_before.get(name, 0.0) for run in runs) / wall

    return LoadResult(
        concurrency=concurrency,
        scenario=scenario,
        requests=len(records),
        tokens=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall,
        ttft_ms=_percentiles([r.ttft for r in records]),
        itl_ms=_percentiles([g for r in records for g in r.gaps]),
        e2e_ms=_percentiles([r.seconds for r in records]),
        mean_batch_size=mean_of("cpm2_batch_size_decode"),
        decode_step_ms=mean_of("cpm2_batch_forward_duration_seconds_decode") * 1000,
        encode_seconds_share=encode_share(),
        mean_distinct_prompts=mean_of("cpm2_batch_distinct_prompts"),
        errors=sum(run.errors for run in runs),
        extra={"round_tokens_per_second": [sum(r.tokens for r in run.records) / run.wall for run in runs]},
    )


def _table(results: list[LoadResult], title: str) -> Table:
    table = Table(title=title)
    for name in ("C", "scenario", "requests", "tok/s", "x C=1", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms"):
        table.add_column(name, justify="right")
    table.add_column("batch", justify="right")
    table.add_column("prompts/batch", justify="right")
    table.add_column("step ms", justify="right")
    table.add_column("encode %", justify="right")
    table.add_column("errors", justify="right")
    single = {r.scenario: r.tokens_per_second for r in results if r.concurrency == 1}
    fmt = lambda p: f"{p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f}"  # noqa: E731
    for r in results:
        scale = r.tokens_per_second / single[r.scenario] if r.scenario in single else float("nan")
        table.add_row(
            str(r.concurrency),
            r.scenario,
            str(r.requests),
            f"{r.tokens_per_second:.1f}",
            f"{scale:.2f}",
            fmt(r.ttft_ms),
            fmt(r.itl_ms),
            f"{r.mean_batch_size:.1f}",
            f"{r.mean_distinct_prompts:.2f}",
            f"{r.decode_step_ms:.1f}",
            f"{100 * r.encode_seconds_share:.0f}",
            str(r.errors),
        )
    return table


def _targets(results: list[LoadResult]) -> dict[str, float]:
    by = {(r.concurrency, r.scenario): r for r in results}
    out: dict[str, float] = {}
    for (c, scenario), many in by.items():
        if c > 1 and (1, scenario) in by:
            one = by[1, scenario]
            step_bound = c * one.decode_step_ms / many.decode_step_ms
            scaling = many.tokens_per_second / one.tokens_per_second
            if c == 16:
                out[f"c16_over_c1 ({scenario})"] = scaling
                out[f"c16_decode_step_bound ({scenario})"] = step_bound
            out[f"share of the decode-step bound (C={c}, {scenario})"] = scaling / step_bound
            # Encoder passes are work the step bound leaves out: with the wall-time shares they took
            # at C and at 1, decode steps alone could reach at most this much of the bound.
            left = (1 - many.encode_seconds_share) / (1 - one.encode_seconds_share)
            out[f"most of the bound encoding leaves (C={c}, {scenario})"] = left
    for c in sorted({r.concurrency for r in results}):
        for mixed in SCENARIOS[1:]:
            if (c, mixed) in by and (c, "one prompt") in by:
                ratio = by[c, mixed].tokens_per_second / by[c, "one prompt"].tokens_per_second
                out[f"mixed_over_one (C={c}, {mixed})"] = ratio
    return out


def _plot(results: list[LoadResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (scenario, marker) in enumerate(zip(SCENARIOS, "os^", strict=True)):
        rows = [r for r in results if r.scenario == scenario]
        if not rows:
            continue
        cs = [r.concurrency for r in rows]
        style = {"marker": marker, "color": f"C{i}"}
        left.plot(cs, [r.tokens_per_second for r in rows], label=scenario, **style)
        right.plot(cs, [r.ttft_ms["p50"] for r in rows], label=f"TTFT p50, {scenario}", **style)
        right.plot(cs, [r.itl_ms["p50"] for r in rows], linestyle="--", label=f"ITL p50, {scenario}", **style)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_ylabel("generated tok/s (aggregate)")
    right.set_ylabel("ms")
    right.set_yscale("log")
    fig.suptitle("cpm2 serve under load (loopback, closed loop)")
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="preset name (built once), directory, or builtin:tiny")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--virtual-tokens", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--server-args", default="", help='more `cpm2 serve` flags, e.g. "--waiting-served-ratio 0.3"')
    # One argument per scenario: "8 ids, same tensors" has a comma of its own.
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), help=f"a subset of {list(SCENARIOS)}")
    parser.add_argument("--rounds", type=int, default=2, help="runs per scenario and level (A B B A)")
    parser.add_argument("--quick", action="store_true", help="C = 1, 4; 8 tokens; few requests")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/serve_load.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests_per_client, args.min_requests, args.new_tokens = "1,4", 2, 4, 8
        args.rounds = 1
        args.out = args.out.with_suffix(".quick.json")
    levels = [int(c) for c in args.concurrency.split(",")]
    chosen = tuple(name.strip() for name in args.scenarios)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {list(SCENARIOS)}")
    console = Console(width=200)
    model = ensure_model(args.model)
    store = CACHE / "serve-load-prompts"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    server = ServerProcess(model, store, args.max_batch_size, shlex.split(args.server_args))
    try:
        server.wait_ready()
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        prompt_ids = upload_prompts(server.url, int(info["d_model"]), args.virtual_tokens)
        # Warm-up: every prompt once, then before each level a burst at that concurrency, so
        # first-call costs (oneDNN primitives for new shapes) are not measured.
        asyncio.run(run_load(server.url, 4, NUM_PROMPTS, list(prompt_ids), args.new_tokens))
        results: list[LoadResult] = []
        for c in levels:
            asyncio.run(run_load(server.url, c, c, list(prompt_ids), args.new_tokens))
            runs: dict[str, list[Run]] = {scenario: [] for scenario in chosen}
            # A B C C B A: drift over the level affects every scenario alike.
            for scenario in (*chosen, *reversed(chosen))[: len(chosen) * args.rounds]:
                console.print(f"  C={c} {scenario}")
                runs[scenario].append(run_once(server.url, c, scenario, prompt_ids, args))
            results += [combine(c, scenario, runs[scenario]) for scenario in chosen]
    finally:
        server.stop()
    results.sort(key=lambda r: (r.concurrency, SCENARIOS.index(r.scenario)))
    title = (
        f"cpm2 serve — {info['model_id']} ({info['dtype']}), {args.virtual_tokens} virtual tokens per prompt, "
        f"{args.new_tokens} new tokens per request"
    )
    console.print(_table(results, title))
    targets = _targets(results)
    for name, value in targets.items():
        if name.startswith("share of the"):
            console.print(f"target {name}: {value:.2f} (≥ 0.9: {'met' if value >= 0.9 else 'NOT met'})")
            continue
        if "bound" in name:
            console.print(f"{name}: {value:.2f}")
            continue
        goal = 8.0 if name.startswith("c16") else 0.95
        console.print(f"target {name}: {value:.2f} (≥ {goal}: {'met' if value >= goal else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "server": info,
        "results": [asdict(r) for r in results],
        "targets": targets,
        "os_cpus": os.cpu_count(),
    }
    args.out.write_text(json.dumps(payload, indent=1))
    if not args.quick:
        _plot(results, args.plot)
        console.print(f"plot: {args.plot}")
    console.print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
