"""Crash consistency of the prompt store: `kill -9` a real server while a client uploads and deletes.

    python -m bench.crash_consistency --kills 100      # a few minutes on 2 cores (one restart per kill)
    python -m bench.crash_consistency --kills 8 --seed 3 --out /tmp/crash.json

One `python -m server` process (the `tiny` preset, written once under `.cache/bench/`) serves a
prompt store in a work directory that outlives it. Each round a client thread starts a burst of
requests against a pool of ids: an upload (random rows, so random bytes) when the client believes
the id is absent, a delete when it believes it present. After a delay drawn from a seeded RNG
(0 to `max_kill_delay_s`) the server gets SIGKILL, mid-request or not. Then:

1. the store directory is read directly: every `<id>/` must hold a whole prompt (its `meta.json`
   names the sha256 of its `prompt.safetensors`, which parses); leftovers of the crash are only
   hidden `.tmp-*` / `.deleted-*` directories;
2. the server restarts on the same directory and answers for every id: a prompt acknowledged with
   201 is listed with the same sha256, its file downloads with that sha256 and it loads (`/tokenize`
   with it); a delete acknowledged with 204 is gone. Only the one request in flight at the kill may
   have gone either way; what the restarted server shows for it becomes the truth for later rounds.

Any difference is a violation. The client itself counts one too when the server contradicts what
it acknowledged earlier (409 for an id it deleted, 404 for one it uploaded). A kill cannot lose
data the kernel already has (no power cut here), so this checks atomicity and ordering (rename,
garbage collection at start), not whether fsync is called; `tests/test_crash_consistency.py`
runs the same loop with a few kills.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.table import Table

from engine.prompts import SoftPrompt, parse_soft_prompt
from tests.server_process import server_process

CACHE = Path(".cache/bench")
TENSOR_FILE = "prompt.safetensors"
META_FILE = "meta.json"
#: Names a crash may leave in the store; the store ignores them and removes them at start.
LEFTOVER_PREFIXES = (".tmp-", ".deleted-")


@dataclass(frozen=True, kw_only=True)
class CrashConfig:
    """One crash-consistency run."""

    model_dir: Path
    """A model directory `python -m server --model` accepts (its d_model shapes the prompts)."""
    workdir: Path
    """Holds the prompt store (`prompts/`) and the server log; the store is reused across restarts."""
    d_model: int = 64
    """Width of the uploaded prompts: the model's d_model."""
    kills: int = 100
    """SIGKILLs, each followed by an inspection and a restart."""
    seed: int = 0
    """Seeds kill delays, the client's choices and the prompt values."""
    max_kill_delay_s: float = 0.3
    """The kill comes uniformly 0..this many seconds after a burst starts."""
    num_ids: int = 8
    """Size of the id pool; a small pool makes uploads and deletes of one id alternate often."""
    max_rows: int = 256
    """Rows of an uploaded prompt, drawn 1..this (the server allows 512 by default)."""

    def __post_init__(self) -> None:
        if self.kills < 1 or self.num_ids < 1 or self.max_rows < 1:
            raise ValueError("kills, num_ids and max_rows must be at least 1")
        if self.max_kill_delay_s < 0:
            raise ValueError("max_kill_delay_s must be >= 0")


@dataclass
class CrashReport:
    """Counts of one run; `violations` says what broke, round by round."""

    kills: int = 0
    uploads_acked: int = 0
    deletes_acked: int = 0
    in_flight_at_kill: int = 0
    """Requests the kill interrupted (their outcome may go either way)."""
    leftovers_after_kill: int = 0
    """Hidden `.tmp-` / `.deleted-` directories seen right after a kill (allowed)."""
    prompts_verified: int = 0
    """Prompt checks after restarts (listed, downloaded, loaded)."""
    restart_seconds: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    """The request in flight: the id and its state before (None: absent) and after (sha256 or None)."""

    prompt_id: str
    before: str | None
    after: str | None


class _Client:
    """Uploads and deletes until the server dies; `expected` holds what the server acknowledged."""

    def __init__(self, url: str, expected: dict[str, str | None], rng: random.Random, config: CrashConfig) -> None:
        self.url = url
        self.expected = expected
        self.rng = rng
        self.config = config
        self.pending: _Pending | None = None
        self.uploads_acked = 0
        self.deletes_acked = 0
        self.violations: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while True:
                prompt_id = self.rng.choice(sorted(self.expected))
                before = self.expected[prompt_id]
                try:
                    if before is None:
                        self._upload(client, prompt_id)
                    else:
                        self._delete(client, prompt_id, before)
                except httpx.TransportError:
                    return  # the kill: `pending` stays set, its outcome is decided by inspection

    def _upload(self, client: httpx.Client, prompt_id: str) -> None:
        rows = self.rng.randint(1, self.config.max_rows)
        generator = torch.Generator().manual_seed(self.rng.getrandbits(63))
        data = SoftPrompt(prefix=torch.randn(rows, self.config.d_model, generator=generator)).to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.pending = _Pending(prompt_id, None, sha)
        r = client.post("/prompts", files={"file": ("p.safetensors", data)}, data={"id": prompt_id})
        self.pending = None
        if r.status_code == 201 and r.json()["sha256"] == sha:
            self.expected[prompt_id] = sha
            self.uploads_acked += 1
        else:
            self.violations.append(f"upload {prompt_id} (believed absent): {r.status_code} {r.text[:200]}")
            raise httpx.TransportError("stop the burst")  # the model of the store is wrong from here

    def _delete(self, client: httpx.Client, prompt_id: str, before: str) -> None:
        self.pending = _Pending(prompt_id, before, None)
        r = client.delete(f"/prompts/{prompt_id}")
        self.pending = None
        if r.status_code == 204:
            self.expected[prompt_id] = None
            self.deletes_acked += 1
        else:
            self.violations.append(f"delete {prompt_id} (believed present): {r.status_code} {r.text[:200]}")
            raise httpx.TransportError("stop the burst")


def inspect_store(root: Path, *, d_model: int) -> tuple[dict[str, str], list[str], int]:
    """What a dead server left in `root`: {id: sha256} of whole prompts, problems found, leftovers."""
    prompts: dict[str, str] = {}
    problems: list[str] = []
    leftovers = 0
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if entry.name.startswith(LEFTOVER_PREFIXES) and entry.is_dir():
            leftovers += 1
            continue
        names = sorted(p.name for p in entry.iterdir()) if entry.is_dir() else None
        if names != sorted((META_FILE, TENSOR_FILE)):
            problems.append(f"{entry.name}: not a whole prompt directory (holds {names})")
            continue
        data = (entry / TENSOR_FILE).read_bytes()
        try:
            meta = json.loads((entry / META_FILE).read_text())
            parse_soft_prompt(data, d_model=d_model, dtype=torch.float32, max_virtual_tokens=2**20)
        except Exception as exc:  # any failure here is a corrupt prompt, which is what is being counted
            problems.append(f"{entry.name}: unreadable ({exc})")
            continue
        if meta.get("sha256") != hashlib.sha256(data).hexdigest():
            problems.append(f"{entry.name}: meta.json sha256 does not match prompt.safetensors")
            continue
        prompts[entry.name] = meta["sha256"]
    return prompts, problems, leftovers


def _served_prompts(client: httpx.Client) -> dict[str, str]:
    """{id: sha256} as the restarted server lists them, after checking each downloads and loads."""
    listed = {p["id"]: p["sha256"] for p in client.get("/prompts").raise_for_status().json()["data"]}
    for prompt_id, sha in listed.items():
        file = client.get(f"/prompts/{prompt_id}/file").raise_for_status()
        if hashlib.sha256(file.content).hexdigest() != sha:
            listed[prompt_id] = f"download differs from the listed sha256 {sha}"
        used = client.post("/tokenize", json={"inputs": "x", "prompt_id": prompt_id})
        if used.status_code != 200:
            listed[prompt_id] = f"does not load: {used.status_code} {used.text[:200]}"
    return listed


def _reconcile(
    where: str,
    found: dict[str, str],
    expected: dict[str, str | None],
    pending: _Pending | None,
    violations: list[str],
) -> None:
    """Compare what survived with what was acknowledged; the interrupted request may go either way."""
    for prompt_id in sorted(set(found) - set(expected)):
        violations.append(f"{where}: unknown prompt {prompt_id}")
    for prompt_id, want in expected.items():
        got = found.get(prompt_id)
        allowed = {want}
        if pending is not None and pending.prompt_id == prompt_id:
            allowed = {pending.before, pending.after}
        if got not in allowed:
            violations.append(f"{where}: {prompt_id} is {got or 'absent'}, expected one of {sorted(map(str, allowed))}")


def run(config: CrashConfig, *, log: Any = print) -> CrashReport:
    """Kill, inspect and restart `config.kills` times; returns the counts and any violations."""
    rng = random.Random(config.seed)
    store = config.workdir / "prompts"
    expected: dict[str, str | None] = {f"p{i}": None for i in range(config.num_ids)}
    report = CrashReport()
    pending: _Pending | None = None
    # Round r checks what the server killed in round r - 1 left, then starts a burst and kills it.
    for round_index in range(config.kills + 1):
        where = f"after kill {round_index}" if round_index else "at start"
        begin = time.monotonic()
        with server_process(config.model_dir, config.workdir) as (process, url):
            report.restart_seconds.append(time.monotonic() - begin)
            with httpx.Client(base_url=url, timeout=30) as probe:
                served = _served_prompts(probe)
            report.prompts_verified += len(served)
            garbage = sorted(p.name for p in store.iterdir() if p.name.startswith(".deleted-"))
            if garbage:
                report.violations.append(f"{where}: the restart left {garbage}")
            _reconcile(f"{where}, served", served, expected, pending, report.violations)
            # The interrupted request went one way or the other; the restarted server says which.
            if pending is not None:
                expected[pending.prompt_id] = served.get(pending.prompt_id)
            if round_index == config.kills:
                break
            client = _Client(url, expected, random.Random(rng.getrandbits(63)), config)
            thread = threading.Thread(target=client.run, daemon=True)
            thread.start()
            time.sleep(rng.uniform(0, config.max_kill_delay_s))
            process.kill()  # SIGKILL: no handler, no drain, no flush
            process.wait()
            thread.join(timeout=60)
        pending = client.pending
        report.kills += 1
        report.uploads_acked += client.uploads_acked
        report.deletes_acked += client.deletes_acked
        report.in_flight_at_kill += pending is not None
        report.violations += [f"kill {report.kills}: {v}" for v in client.violations]
        on_disk, problems, leftovers = inspect_store(store, d_model=config.d_model)
        report.leftovers_after_kill += leftovers
        report.violations += [f"after kill {report.kills}, on disk: {p}" for p in problems]
        _reconcile(f"after kill {report.kills}, on disk", on_disk, expected, pending, report.violations)
        if report.kills % 10 == 0:
            log(f"{report.kills}/{config.kills} kills, {len(report.violations)} violations")
    return report


def _table(report: CrashReport) -> Table:
    table = Table(title="prompt store under kill -9")
    table.add_column("measure")
    table.add_column("value", justify="right")
    restarts = sorted(report.restart_seconds)
    rows = [
        ("kills", report.kills),
        ("uploads acknowledged (201)", report.uploads_acked),
        ("deletes acknowledged (204)", report.deletes_acked),
        ("requests in flight at the kill", report.in_flight_at_kill),
        ("hidden leftovers seen after kills", report.leftovers_after_kill),
        ("prompt checks after restarts", report.prompts_verified),
        ("median restart (s)", f"{restarts[len(restarts) // 2]:.2f}" if restarts else "-"),
        ("violations", len(report.violations)),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _tiny_model(cache: Path) -> Path:
    from engine.weights.init import write_random_model
    from engine.weights.presets import get_preset

    path = cache / "crash-tiny"
    if not (path / "config.json").exists():
        write_random_model(get_preset("tiny").config, path, seed=0, progress=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kill-delay", type=float, default=0.3, help="seconds after a burst starts")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: tiny preset, cached)")
    parser.add_argument("--workdir", type=Path, default=CACHE / "crash-work", help="emptied first")
    parser.add_argument("--out", type=Path, default=Path("bench/results/crash_consistency.json"))
    args = parser.parse_args(argv)
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    model_dir = args.model or _tiny_model(CACHE)
    config = CrashConfig(
        model_dir=model_dir,
        workdir=args.workdir,
        d_model=json.loads((model_dir / "config.json").read_text()).get("d_model", 64),
        kills=args.kills,
        seed=args.seed,
        max_kill_delay_s=args.max_kill_delay,
    )
    console = Console()
    started = time.monotonic()
    report = run(config, log=console.print)
    console.print(_table(report))
    for violation in report.violations[:20]:
        console.print(f"[red]{violation}")
    payload = {
        "command": f"python -m bench.crash_consistency --kills {args.kills} --seed {args.seed}",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "seconds": round(time.monotonic() - started, 1),
        "kills": report.kills,
        "uploads_acked": report.uploads_acked,
        "deletes_acked": report.deletes_acked,
        "in_flight_at_kill": report.in_flight_at_kill,
        "leftovers_after_kill": report.leftovers_after_kill,
        "prompts_verified": report.prompts_verified,
        "median_restart_seconds": sorted(report.restart_seconds)[len(report.restart_seconds) // 2],
        "num_violations": len(report.violations),
        "violations": report.violations,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    console.print(f"wrote {args.out}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
