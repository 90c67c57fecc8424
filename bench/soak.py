"""Soak test: a real `cpm2 serve` process under 30 minutes of mixed load, watched for leaks.

    python -m bench.soak                      # 30 minutes, 8 clients, the `small` preset (`make soak`)
    python -m bench.soak --minutes 5 --concurrency 4 --model builtin:tiny

The server runs as its own process on loopback (`bench.serve_load.ServerProcess`; by default the
`small` preset, CPM-2 architecture, 6 + 6 layers, d_model 512, 16 experts per block, so a decode
step does real work on a small CPU machine without encoding dominating). `--concurrency` closed-loop
clients send the mix of `bench.soak_mix`: /generate greedy and sampled with various
max_new_tokens, /generate_stream read to the end or hung up on after a few tokens, /v1/completions
(plain and streamed), /tokenize, generations with shared soft prompts (prefix, infix, suffix, all
four) and with prompts each client uploads, uses and deletes, and invalid requests that must be
refused with their 4xx (504 for an impossible deadline).

Every `--sample-seconds` the server process's RSS (and its anonymous part: memory-mapped weights
are file-backed and come and go with the page cache), open file descriptors (and how many are
sockets: client connections come and go) and threads are sampled, with a scrape of /metrics.

Reported (`bench.soak_report`): requests by kind; errors (an unexpected status, a broken stream, a
malformed answer, an ERROR or traceback in the server's log, a request the server still holds once
every client has gone); RSS when warm (median over 10-15 % of the run) against the end (median over
the last 5 %) and its slope after warm-up; descriptors warm vs end, and idle before vs after the load
(no client connected, so only what the server keeps open by itself); throughput.
Targets: RSS growth <= 5 %, no descriptor growth, 0 errors; the exit status is 1 if one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from rich.console import Console

from bench.machine import machine_info
from bench.serve_load import CACHE, ServerProcess, ensure_model
from bench.soak_mix import WEIGHTS, Outcome, SoakClient, upload_shared_prompts
from bench.soak_report import plot, summarize, tables

MIB = 2**20

_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)$")


def probe(pid: int) -> dict[str, float]:
    """RSS, descriptors and threads of process `pid` (psutil where installed, else /proc)."""
    proc = Path(f"/proc/{pid}")
    sample: dict[str, float] = {}
    try:
        import psutil  # type: ignore[import-untyped]  # not a declared dependency: /proc otherwise

        process = psutil.Process(pid)
        sample |= {"rss_mib": process.memory_info().rss / MIB, "fds": process.num_fds()}
        sample["threads"] = process.num_threads()
    except ImportError:
        status = proc_status(proc)
        sample |= {"rss_mib": status["VmRSS"] / 1024, "threads": status["Threads"]}
        sample["fds"] = len(os.listdir(proc / "fd"))
    if proc.exists():
        sample["rss_anon_mib"] = proc_status(proc).get("RssAnon", float("nan")) / 1024
        sample["sockets"] = _count_sockets(proc / "fd")
        sample["files"] = sample["fds"] - sample["sockets"]
    return sample


def proc_status(proc: Path) -> dict[str, float]:
    """Memory (kB: resident `VmRSS`, its peak `VmHWM`, anonymous `RssAnon`) and `Threads` of the
    process `proc` (`/proc/<pid>` or `/proc/self`)."""
    out = {}
    for line in (proc / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
            out[name] = float(value.split()[0])
    return out


def _count_sockets(fd_dir: Path) -> int:
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(fd_dir / name).startswith("socket:")
        except FileNotFoundError:  # closed between listing and reading
            continue
    return count


def log_problems(log: Path) -> list[str]:
    """ERROR / CRITICAL records and tracebacks in the server's log: failures no client may see."""
    pattern = re.compile(r"\b(ERROR|CRITICAL)\b|^Traceback")
    return [line for line in log.read_text(errors="replace").splitlines() if pattern.search(line)]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition to {metric name: value summed over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_LINE.match(line)
        if match:
            out[match[1]] = out.get(match[1], 0.0) + float(match[2])
    return out


async def _sampler(
    client: httpx.AsyncClient, pid: int, outcomes: list[Outcome], start: float, every: float, stop: asyncio.Event
) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    while True:
        sample = {"t_s": time.monotonic() - start, **probe(pid)}
        sample["requests"] = len(outcomes)
        sample["errors"] = sum(o.error is not None for o in outcomes)
        try:
            metrics = parse_metrics((await client.get("/metrics")).text)
            for name in ("cpm2_prompt_cache_bytes", "cpm2_prompts_registered", "cpm2_requests_running"):
                sample[name.removeprefix("cpm2_")] = metrics.get(name, float("nan"))
        except httpx.HTTPError:
            pass  # a missed scrape is not a failure of the server under test; the requests tell that
        samples.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return samples
        except TimeoutError:
            continue


async def run_load(
    url: str,
    *,
    pid: int,
    seconds: float,
    concurrency: int,
    sample_every: float,
    model_name: str,
    d_model: int,
    seed: int,
) -> tuple[list[Outcome], list[dict[str, float]], float]:
    """`concurrency` clients running the mix for `seconds`: (outcomes, samples, wall seconds)."""
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.monotonic()
        deadline = start + seconds
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sampler(client, pid, outcomes, start, sample_every, stop))

        async def loop(index: int) -> None:
            soak = SoakClient(client, index=index, model_name=model_name, d_model=d_model, outcomes=outcomes, seed=seed)
            while time.monotonic() < deadline:
                await soak.step()

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        wall = time.monotonic() - start
        stop.set()
        samples = await sampler
    return outcomes, samples, wall


async def warm_up(url: str, *, model_name: str, d_model: int) -> list[Outcome]:
    """Every operation once, so lazily created state exists before the idle descriptor count."""
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        soak = SoakClient(client, index=999, model_name=model_name, d_model=d_model, outcomes=outcomes)
        for kind in WEIGHTS:
            await soak.step(kind)
    return outcomes


#: Seconds a request the clients have left may take to leave the server (a timed-out or cancelled
#: one is dropped at the engine's next step, which on 2 busy cores can come seconds later).
SETTLE_SECONDS = 20.0
HELD = ("requests_in_flight", "requests_running", "requests_waiting")


def settled_metrics(url: str, *, within: float = SETTLE_SECONDS) -> dict[str, float]:
    """The server's metrics once it holds no request, or after `within` seconds: what it still
    holds then is a leak, not a request on its way out."""
    deadline = time.monotonic() + within
    while True:
        scraped = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        if sum(scraped.get(f"cpm2_{n}", 0.0) for n in HELD) == 0 or time.monotonic() > deadline:
            return scraped
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load phase")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--model", default="small", help="preset name (built once), directory, or builtin:tiny")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="how often RSS and fds are sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--server-args", default="", help="more `cpm2 serve` flags")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/soak.png"))
    parser.add_argument("--work-dir", type=Path, default=CACHE / "soak", help="the prompt store and the server log")
    args = parser.parse_args(argv)
    console = Console(width=160)
    model = ensure_model(args.model)
    store, log = args.work_dir / "prompts", args.work_dir / "server.log"
    shutil.rmtree(store, ignore_errors=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(model, store, args.max_batch_size, shlex.split(args.server_args), log=log)
    try:
        server.wait_ready()
        pid = server.process.pid
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        model_name, d_model = str(info["model_id"]), int(info["d_model"])
        upload_shared_prompts(server.url, d_model)
        warm = asyncio.run(warm_up(server.url, model_name=model_name, d_model=d_model))
        time.sleep(1)  # let the server notice the warm-up client's connections closing
        idle = {"before": probe(pid)}
        console.print(f"soak: {args.minutes:g} min, {args.concurrency} clients, server pid {pid}, log {log}")
        outcomes, samples, wall = asyncio.run(
            run_load(
                server.url,
                pid=pid,
                seconds=args.minutes * 60,
                concurrency=args.concurrency,
                sample_every=args.sample_seconds,
                model_name=model_name,
                d_model=d_model,
                seed=args.seed,
            )
        )
        scraped = settled_metrics(server.url)
        idle["after"] = probe(pid)
        names = ["generation_tokens", "requests_cancelled", "requests_timed_out", "engine_request_failures"]
        names += ["prompt_cache_evictions", "prompt_cache_hits", "prompt_cache_misses"]
        counters = {f"cpm2_{n}_total": scraped.get(f"cpm2_{n}_total", float("nan")) for n in names}
        # At idle these must be back to 0 (in flight, running, waiting) and to the shared prompts.
        gauges = ["prompts_registered", "prompt_cache_entries", *HELD]
        counters |= {f"cpm2_{n}": scraped.get(f"cpm2_{n}", float("nan")) for n in gauges}
    finally:
        server.stop()
    counters["server_exit_status"] = float(server.process.returncode or 0)
    problems = log_problems(log)
    report = summarize(outcomes, warm, samples, wall, idle=idle, counters=counters, server_log_problems=problems)
    title = f"cpm2 soak — {info['model_id']} ({info['dtype']}), {args.concurrency} clients, {wall / 60:.1f} min"
    for table in tables(report, title):
        console.print(table)
    tput = report["throughput"]
    console.print(
        f"throughput: {tput['requests_per_s']:.2f} requests/s, {tput['generated_tokens_per_s']:.1f} generated tok/s; "
        f"cancelled by disconnect: {counters['cpm2_requests_cancelled_total']:.0f}, "
        f"timed out: {counters['cpm2_requests_timed_out_total']:.0f}"
    )
    for example in [*report["error_examples"], *report["server_log_examples"]]:
        console.print("error:", example, markup=False)
    payload = {
        "benchmark": "soak",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "server": info,
        **report,
        "idle_samples": idle,
        "samples": samples,
        "warm_up": [asdict(o) for o in warm],
    }
    args.out.write_text(json.dumps(payload, indent=1))
    plot(samples, wall, args.plot, title)
    console.print(f"JSON: {args.out}  plot: {args.plot}")
    return 0 if all(v for k, v in report["targets"].items() if k.startswith("is_")) else 1


if __name__ == "__main__":
    # `kill` of a soak running in the background (where SIGINT is ignored) still stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
