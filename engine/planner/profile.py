"""A machine as the planner sees it: the rates that bound an offloaded MoE step, and where they came from.

A profile is measured on this machine (`cpm2 plan --measure`, `engine.planner.measure`) or shipped
for machines we do not have (`engine/planner/profiles/*.json`, each naming its sources). Rates are
what the engine's own kernels and reader reach, not datasheet peaks: a decode step is a chain of
matrix-vector products bound by how fast weights stream from memory (`gemv_gb_s`), an encoder pass
is bound by arithmetic (`tflops`), and each call and each block of the engine's Python costs a
fixed time that small models feel most (`call_us`, `OverheadProfile`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

#: Weight formats a profile gives matmul rates for: the engine's compute dtypes and quantised formats.
FORMATS = ("float32", "bfloat16", "int8", "int4")
#: The matrices streaming rates are measured on (`MatmulRates`, `engine.planner.measure`).
SMALL_SHAPE = (2048, 512)
LARGE_SHAPE = (4096, 4096)
SMALL_PARAMETERS = SMALL_SHAPE[0] * SMALL_SHAPE[1]
LARGE_PARAMETERS = LARGE_SHAPE[0] * LARGE_SHAPE[1]
#: Loads in flight `OverheadProfile.load_window_us` is measured with (`--expert-window`'s default).
LOAD_WINDOW = 4


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}: {name} must be > 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class MatmulRates:
    """How fast weights of one format are multiplied (`engine.model.linear`'s paths)."""

    gemv_gb_s: float
    """Weight bytes per second at one input row (decoding at batch 1), on a large matrix
    (`LARGE_PARAMETERS`: 4096 x 4096)."""
    gemv16_gb_s: float
    """Weight bytes per second at 16 input rows (decoding a batch; one expert's tokens), large matrix."""
    small_gemv_gb_s: float
    """Weight bytes per second at one input row on a small matrix (`SMALL_PARAMETERS`: 2048 x 512):
    kernels stream small matrices slower (measured here: int8 6.6 GB/s at 2048 x 512, 15.5 at
    2048 x 8192), so rates are interpolated between the two sizes by the matrix's size."""
    tflops: float
    """Arithmetic rate (10^12 multiply-adds x 2 per second) at hundreds of rows (an encoder pass)."""
    call_us: float
    """Fixed cost of one call: dispatch, and the floor a small matrix does not get under."""

    def __post_init__(self) -> None:
        _positive(
            "MatmulRates",
            gemv_gb_s=self.gemv_gb_s,
            gemv16_gb_s=self.gemv16_gb_s,
            small_gemv_gb_s=self.small_gemv_gb_s,
            tflops=self.tflops,
        )
        if self.call_us < 0:
            raise ConfigError(f"MatmulRates: call_us must be >= 0, got {self.call_us}")

    def seconds(self, *, rows: int, weight_bytes: float, parameters: float) -> float:
        """One call on a weight of `weight_bytes` (`parameters` multiply-adds per row) with `rows` rows:
        the slower of streaming the weight and the arithmetic, plus the call's fixed cost."""
        if rows <= 1:
            rate = self.gemv_gb_s
        elif rows < 16:  # between the two measured points, linearly
            rate = self.gemv_gb_s + (self.gemv16_gb_s - self.gemv_gb_s) * (rows - 1) / 15
        else:
            rate = self.gemv16_gb_s
        # Smaller matrices stream slower: scale by the small/large ratio, log-linearly in size.
        span = math.log(LARGE_PARAMETERS / SMALL_PARAMETERS)
        large_share = min(1.0, max(0.0, math.log(max(parameters, 1) / SMALL_PARAMETERS) / span))
        rate *= (self.small_gemv_gb_s / self.gemv_gb_s) ** (1 - large_share)
        stream = weight_bytes / (rate * 1e9)
        arithmetic = 2 * rows * parameters / (self.tflops * 1e12)
        return self.call_us * 1e-6 + max(stream, arithmetic)


def overlapping_part(alone: float, together: float, *, in_flight: float) -> float:
    """o of a per-load cost measured `alone` = s + o (one load in flight) and `together` = s + o / n
    (`in_flight` = n loads in flight), with s, o >= 0: 0 where nothing overlaps."""
    if in_flight <= 1 or together >= alone:
        return 0.0
    return min(alone, (alone - together) / (1 - 1 / in_flight))


@dataclass(frozen=True, kw_only=True)
class OverheadProfile:
    """The engine's own time per unit of work beyond its matmuls (Python, small ops, bookkeeping),
    measured on tiny models where nothing else costs anything."""

    step_us: float
    """Per decode step: embedding, final norm, head dispatch, the step's bookkeeping."""
    block_us: float
    """Per transformer block and step at one row: norms, attention's small ops, residual adds."""
    moe_layer_us: float
    """Per MoE layer and step: routing, dispatch and combine around the experts."""
    expert_us: float
    """Per expert computed: gathering its tokens, its activation, scattering the result."""
    load_us: float
    """Per expert loaded by the offloading provider, one load in flight (decoding at batch 1): pool
    bookkeeping, handing the read to an I/O thread, and the wake-ups on its completion."""
    block16_us: float | None = None
    """`block_us` at 16 rows (a decode batch): the small ops grow with the rows they touch. None in
    profiles measured before it was (then `block_us` at every batch)."""
    load_window_us: float | None = None
    """`load_us` per load while a layer queues `LOAD_WINDOW` or more (an encoder pass, a decode
    batch): the hand-offs and wake-ups of loads in flight together overlap, the engine thread's
    bookkeeping does not (`load_parts`). None in profiles measured before it was (then every load
    costs `load_us`, as if alone)."""

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value is not None and value < 0:
                raise ConfigError(f"OverheadProfile: {name} must be >= 0, got {value}")

    def load_parts(self) -> tuple[float, float]:
        """(serial, overlapping) seconds of the provider's own time per load: the engine thread's
        bookkeeping, paid by every load in turn, and the hand-offs and wake-ups, shared by the loads
        in flight together like a read's latency. They solve the two measured points, `load_us` =
        serial + overlapping (one load) and `load_window_us` = serial + overlapping / `LOAD_WINDOW`."""
        if self.load_window_us is None:
            return self.load_us * 1e-6, 0.0
        overlapping = overlapping_part(self.load_us, self.load_window_us, in_flight=LOAD_WINDOW)
        return (self.load_us - overlapping) * 1e-6, overlapping * 1e-6

    def block_seconds(self, rows: int) -> float:
        """One block's own time at `rows` rows: between the two measured points linearly, the 16-row
        figure beyond (an encoder pass's hundreds of rows are bound by its matmuls, not these)."""
        at16 = self.block_us if self.block16_us is None else self.block16_us
        share = min(1.0, max(0, rows - 1) / 15)
        return (self.block_us + (at16 - self.block_us) * share) * 1e-6


@dataclass(frozen=True, kw_only=True)
class GpuProfile:
    """An accelerator: dense weights and the expert pool live in its memory."""

    name: str
    memory_bytes: int
    """Usable device memory."""
    h2d_gb_s: float
    """Host (pinned) to device copy rate, as measured (not the link's peak)."""
    matmul: dict[str, MatmulRates]
    """Rates per weight format (keys from `FORMATS`) on the device."""

    def __post_init__(self) -> None:
        _positive(f"GpuProfile {self.name}", memory_bytes=self.memory_bytes, h2d_gb_s=self.h2d_gb_s)
        _check_formats(f"GpuProfile {self.name}", self.matmul)


def _check_formats(owner: str, matmul: dict[str, MatmulRates]) -> None:
    missing = [f for f in FORMATS if f not in matmul]
    unknown = [f for f in matmul if f not in FORMATS]
    if missing or unknown:
        raise ConfigError(
            f"{owner}: matmul rates needed for {', '.join(FORMATS)}; missing {missing}, unknown {unknown}"
        )


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """One machine: CPU matmul rates, memory, storage and (optionally) an accelerator."""

    name: str
    source: str
    """Where the numbers come from: `measured by cpm2 plan --measure on <host>, <date>`, or citations."""
    cpu_cores: int
    ram_bytes: int
    """Memory the engine may use (total RAM less what the system keeps)."""
    memcpy_gb_s: float
    """One thread's large-copy rate in RAM (a page-cache hit, KV-cache reads)."""
    disk_read_gb_s: float
    """Cold reads of expert-sized blobs with the provider's reader (O_DIRECT, several in flight)."""
    disk_latency_us: float
    """Fixed cost of one expert read beyond its bytes (submission, completion, the first sector)."""
    cpu: dict[str, MatmulRates]
    """CPU rates per weight format (keys from `FORMATS`)."""
    overhead: OverheadProfile
    gpu: GpuProfile | None = None
    read_contention: float = 1.0
    """How many times longer CPU matmuls take while expert reads are in flight (the reader's threads
    and completions share the cores): measured on few-core machines, 1 where cores are to spare."""

    def __post_init__(self) -> None:
        _positive(
            f"profile {self.name}",
            cpu_cores=self.cpu_cores,
            ram_bytes=self.ram_bytes,
            memcpy_gb_s=self.memcpy_gb_s,
            disk_read_gb_s=self.disk_read_gb_s,
        )
        _check_formats(f"profile {self.name}", self.cpu)
        if not 1.0 <= self.read_contention < 10.0:
            raise ConfigError(f"profile {self.name}: read_contention must be in [1, 10), got {self.read_contention}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> HardwareProfile:
        """Build and check a profile; `source` names where `data` came from in error messages."""
        try:
            fields = dict(data)
            fields["cpu"] = {k: MatmulRates(**v) for k, v in data["cpu"].items()}
            fields["overhead"] = OverheadProfile(**data["overhead"])
            if data.get("gpu") is not None:
                gpu = dict(data["gpu"])
                gpu["matmul"] = {k: MatmulRates(**v) for k, v in gpu["matmul"].items()}
                fields["gpu"] = GpuProfile(**gpu)
            return cls(**fields)
        except (KeyError, TypeError, AttributeError) as error:
            raise ConfigError(f"{source}: not a hardware profile ({error}); see `cpm2 plan --measure`") from error

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def reference_profiles() -> dict[str, Path]:
    """The profiles shipped with cpm2, by name."""
    folder = resources.files("engine.planner") / "profiles"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def load_profile(spec: str | Path) -> HardwareProfile:
    """A profile from a JSON file, or a shipped one by name (`reference_profiles`)."""
    shipped = reference_profiles()
    path = shipped.get(str(spec), Path(spec))
    if not path.is_file():
        raise ConfigError(
            f"--hardware {spec}: no such file or shipped profile; shipped: {', '.join(sorted(shipped))} "
            "(or write this machine's with `cpm2 plan --measure --out FILE`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not JSON ({error})") from error
    return HardwareProfile.from_dict(data, source=str(path))
