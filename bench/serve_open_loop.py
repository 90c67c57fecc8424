"""The HTTP server under open-loop traffic: Poisson arrivals of requests of varied lengths, server
settings side by side.

    python -m bench.serve_open_loop                      # share 0 against 0.5 and 1, ~6 min on 2 cores
    python -m bench.serve_open_loop --rate 4 --requests 100
    python -m bench.serve_open_loop --arms "off=--encoder-step-share 0" "half=--encoder-step-share 0.5"

`bench.serve_load` drives the server with closed-loop clients that all generate the same number of
tokens, so requests that start together end together and the next ones arrive together: encoding
and decoding alternate in waves, which hides how a newcomer's encoder pass stalls the rows already
streaming. Here requests arrive as a Poisson process at `--rate` per second (seeded, so every arm
gets the same arrival times), each generating 8-64 tokens (`ignore_eos`, greedy) from one of the
serving benchmark's short inputs, with its soft prompt of 100 virtual tokens.

Each arm is a `cpm2 serve` process with its own flags (`name=flags`), run in turn, `--rounds` times
(A B B A), on the `small` preset (`bench.serve_load`'s model). Reported per arm: generated tok/s,
time to first token and inter-token latency percentiles as the client sees them, and from
`/metrics` the mean decode step and the share of wall time spent encoding. Nothing is a target; the
table shows what a setting trades.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info
from bench.serve_load import (
    CACHE,
    INPUTS,
    RequestRecord,
    ServerProcess,
    _one_request,
    _percentiles,
    batch_counters,
    ensure_model,
    upload_prompts,
)

DEFAULT_ARMS = (
    "share 0=--encoder-step-share 0",
    "share 0.5=--encoder-step-share 0.5",
    "share 1=--encoder-step-share 1",
)


@dataclass
class ArmResult:
    arm: str
    flags: str
    requests: int
    tokens: int
    tokens_per_second: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    decode_step_ms: float
    encode_seconds_share: float
    errors: int
    round_tokens_per_second: list[float]


def schedule(rate: float, count: int, seed: int) -> list[tuple[float, int, int]]:
    """(seconds after the start, tokens to generate, input index) of each request."""
    rng = random.Random(seed)
    at = 0.0
    plan = []
    for _ in range(count):
        at += rng.expovariate(rate)
        plan.append((at, rng.randint(8, 64), rng.randrange(len(INPUTS))))
    return plan


async def run_open_loop(
    url: str, plan: list[tuple[float, int, int]], prompt_id: str
) -> tuple[list[RequestRecord], int, float]:
    """Send each request of `plan` at its time, whatever is still running: (records, errors, wall s)."""
    records: list[RequestRecord] = []
    errors = 0

    async def one(client: httpx.AsyncClient, start: float, at: float, new_tokens: int, text: int) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        parameters = {"max_new_tokens": new_tokens, "ignore_eos": True, "prompt_id": prompt_id}
        try:
            records.append(await _one_request(client, {"inputs": INPUTS[text], "parameters": parameters}))
        except (RuntimeError, httpx.HTTPError):
            errors += 1

    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, start, *item) for item in plan))
        wall = time.perf_counter() - start
    return records, errors, wall


def run_arm(model: str, flags: str, plan: list[tuple[float, int, int]], virtual_tokens: int) -> dict[str, Any]:
    """One server with `flags`, warmed up, then the whole plan: its records and metrics."""
    store = CACHE / "serve-open-loop-prompts"
    shutil.rmtree(store, ignore_errors=True)
    server = ServerProcess(model, store, 64, shlex.split(flags))
    try:
        server.wait_ready()
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        prompt_id = upload_prompts(server.url, int(info["d_model"]), virtual_tokens)[0]
        asyncio.run(run_open_loop(server.url, [(0.0, 8, i % len(INPUTS)) for i in range(8)], prompt_id))
        before = batch_counters(server.url)
        records, errors, wall = asyncio.run(run_open_loop(server.url, plan, prompt_id))
        after = batch_counters(server.url)
    finally:
        server.stop()
    return {"records": records, "errors": errors, "wall": wall, "before": before, "after": after}


def combine(arm: str, flags: str, runs: list[dict[str, Any]]) -> ArmResult:
    records: list[RequestRecord] = [r for run in runs for r in run["records"]]
    wall = sum(run["wall"] for run in runs)

    def delta(name: str) -> float:
        return sum(run["after"].get(name, 0.0) - run["before"].get(name, 0.0) for run in runs)

    steps = delta("cpm2_batch_forward_duration_seconds_decode_count")
    return ArmResult(
        arm=arm,
        flags=flags,
        requests=len(records),
        tokens=sum(r.tokens for r in records),
        tokens_per_second=sum(r.tokens for r in records) / wall,
        ttft_ms=_percentiles([r.ttft for r in records]),
        itl_ms=_percentiles([g for r in records for g in r.gaps]),
        decode_step_ms=1000 * delta("cpm2_batch_forward_duration_seconds_decode_sum") / steps if steps else 0.0,
        encode_seconds_share=delta("cpm2_batch_forward_duration_seconds_encode_sum") / wall,
        errors=sum(run["errors"] for run in runs),
        round_tokens_per_second=[sum(r.tokens for r in run["records"]) / run["wall"] for run in runs],
    )


def _table(results: list[ArmResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("arm", "tok/s", "TTFT p50/p90 ms", "ITL p50/p90/p99 ms", "step ms", "encode %", "errors"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for r in results:
        table.add_row(
            r.arm,
            f"{r.tokens_per_second:.1f}",
            f"{r.ttft_ms['p50']:.0f} / {r.ttft_ms['p90']:.0f}",
            f"{r.itl_ms['p50']:.0f} / {r.itl_ms['p90']:.0f} / {r.itl_ms['p99']:.0f}",
            f"{r.decode_step_ms:.1f}",
            f"{100 * r.encode_seconds_share:.0f}",
            str(r.errors),
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="preset name (built once) or directory")
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second (Poisson)")
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--virtual-tokens", type=int, default=100)
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help='"name=cpm2 serve flags" each')
    parser.add_argument("--rounds", type=int, default=2, help="runs per arm, in the order A B B A")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_open_loop.json"))
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.requests < 2:
        parser.error("--rate must be > 0 and --requests at least 2")
    arms = []
    for spec in args.arms:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            parser.error(f"arm {spec!r} is not name=flags")
        arms.append((name, flags))
    model = ensure_model(args.model)
    plan = schedule(args.rate, args.requests, args.seed)
    console = Console(width=160)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in arms}
    order = list(itertools.islice(itertools.cycle([*arms, *reversed(arms)]), len(arms) * args.rounds))
    for name, flags in order:
        console.print(f"  {name}: {flags}")
        runs[name].append(run_arm(model, flags, plan, args.virtual_tokens))
    results = [combine(name, flags, runs[name]) for name, flags in arms]
    title = f"cpm2 serve — open loop, {args.rate:g} requests/s, 8-64 new tokens, {Path(model).name}"
    console.print(_table(results, title))
    payload = {"config": {**vars(args), "out": str(args.out)}, "machine": machine_info(), "results": []}
    payload["results"] = [asdict(r) for r in results]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    console.print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
