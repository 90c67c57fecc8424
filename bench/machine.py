"""What a benchmark ran on, and how fast this machine streams weights through a GEMV.

Decoding one token reads every weight it uses once with a single input row, so its speed limit
is memory bandwidth. The reference here is the best a plain matrix-vector product reaches over a
weight far larger than any cache, through the same packed oneDNN path cpm2 decodes with
(`engine.model.linear`) and through `F.linear`, so a benchmark can say how close to that limit the
engine runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from engine.model.kernels import active_kernels, cpu_capability
from engine.model.linear import can_pack, linear, pack_weight


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions and torch's thread count, for a results file."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torch_num_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        # Which matmul each dtype takes here decides what a timing measures (engine.model.kernels).
        "cpu_capability": cpu_capability(),
        "cpu_kernels": {
            str(dtype).removeprefix("torch."): active_kernels().for_dtype(dtype).to_dict()
            for dtype in (torch.float32, torch.bfloat16)
        },
        "int4_packing": active_kernels().int4_packing or f"none: {active_kernels().int4_reason}",
        # Other processes on a small machine skew timings; the load average shows whether they ran.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


class CpuMeter:
    """How much of the machine's CPU time other processes used since `start()` (Linux `/proc/stat`).

    On a small machine a busy neighbour does not just take its share: it stalls the spinning
    barriers of multi-threaded kernels, slowing them several times over. A benchmark uses this to
    tell a clean repetition from a contended one.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _machine_busy_s() -> float | None:
        try:
            first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user).
        ticks = [int(v) for v in first[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_cpu_s() -> float:
        """CPU time of this process and its children (live ones from `/proc`, reaped ones from
        `os.times`): a system under test may run in a child process (`bench.ct2_worker`)."""
        own = os.times()
        total = own.user + own.system + own.children_user + own.children_system
        tick = os.sysconf("SC_CLK_TCK")
        for children in Path("/proc/self/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    # Fields after the command name (which may hold spaces): utime, stime are 12th, 13th.
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue  # exited meanwhile: its time moves to children_* once reaped
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def start(self) -> None:
        busy = self._machine_busy_s()
        self._start = None if busy is None else (time.perf_counter(), busy, self._own_cpu_s())

    def foreign_share(self) -> float | None:
        """Other processes' CPU time since `start()` over the machine's capacity (0..1); None if unknown."""
        busy = self._machine_busy_s()
        if self._start is None or busy is None:
            return None
        wall0, busy0, own0 = self._start
        capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        foreign = (busy - busy0) - (self._own_cpu_s() - own0)
        return max(0.0, foreign / capacity) if capacity > 0 else None


def _time_calls(fn: Any, *, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def measure_gemv_bandwidth(
    *, dtype: torch.dtype, weight_bytes: int = 256 * 2**20, in_features: int = 4096, repeats: int = 30
) -> dict[str, Any]:
    """GB/s (10^9 bytes/s) of `x @ W.T` for one input row over a `weight_bytes` weight in `dtype`.

    Reports the best and median call, for the packed layout cpm2 uses and for `F.linear`. The best
    call is the machine's capability; the median also shows how much other processes interfered.
    """
    element = torch.empty((), dtype=dtype).element_size()
    out_features = max(1, weight_bytes // (in_features * element))
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = torch.randn(1, in_features, dtype=dtype)
    num_bytes = weight.numel() * element
    paths: dict[str, Any] = {"f_linear": lambda w: F.linear(x, w)}
    weights = {"f_linear": weight}
    if can_pack(weight):
        weights["packed"] = pack_weight(weight)
        paths["packed"] = lambda w: linear(x, w)
    result: dict[str, Any] = {"weight_bytes": num_bytes, "shape": [out_features, in_features]}
    for name, call in paths.items():
        w = weights[name]
        _time_calls(lambda call=call, w=w: call(w), repeats=2)  # warm-up: page in, pick kernels
        times = _time_calls(lambda call=call, w=w: call(w), repeats=repeats)
        result[name] = {
            "times_s": times,
            "best_gb_s": num_bytes / min(times) / 1e9,
            "median_gb_s": num_bytes / statistics.median(times) / 1e9,
        }
    return result


def median_ms(action: Callable[[], object], repeats: int, *, prepare: Callable[[], object] | None = None) -> float:
    """Median milliseconds of `action` over `repeats` calls, each after `prepare` (untimed); without
    `prepare`, one untimed call first (kernel selection, allocator warm-up)."""
    if prepare is None:
        action()
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        begin = time.perf_counter()
        action()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def add_rows_options(parser: argparse.ArgumentParser, *, name: str, repeats: int) -> None:
    """`--quick` (B = 1 and 16, 3 repeats), `--repeats` (default `repeats`), `--out` of a benchmark
    over B = 1 / 16 / 64 rows."""
    parser.add_argument("--quick", action="store_true", help="B = 1 and 16, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help=f"default {repeats}; 3 with --quick")
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{name}.json"))
    parser.set_defaults(default_repeats=repeats)


def rows_options(args: argparse.Namespace, argv: Sequence[str] | None) -> tuple[tuple[int, ...], int, Path]:
    """(rows, repeats, JSON path) from `add_rows_options`' options; a quick run from the command line
    writes NAME.quick.json, so it does not replace the recorded results."""
    rows = (1, 16) if args.quick else (1, 16, 64)
    out = args.out.with_suffix(".quick.json") if args.quick and argv is None else args.out
    return rows, args.repeats or (3 if args.quick else args.default_repeats), out


def publish(
    report: dict[str, Any],
    *,
    out: Path,
    plot: Path | None,
    show: Callable[[dict[str, Any], Console], None],
    draw: Callable[[dict[str, Any], Path], Path | None],
    width: int,
) -> None:
    """Write `report` as JSON to `out`, print it with `show`, and draw its plot when `plot` is set."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    show(report, Console(width=width))
    if plot is not None and draw(report, plot):
        print(f"plot: {plot}")
    print(f"JSON: {out}")


def reset_peak_rss() -> None:
    """Return freed memory to the OS (glibc `malloc_trim`) and restart this process's RSS high-water
    mark (`VmHWM`) from its current RSS (Linux `clear_refs` 5), so a peak measured next is the
    measured phase's own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
