"""What a model will do on a machine before it is downloaded: memory, tok/s and time to first token.

`predict` is a model of the offloading provider, not a second scheduler. Memory comes from the plan
loading itself follows (`engine.memory_plan.plan_memory`: pool slots, staging, bytes per expert in
the stored format). Time comes from replaying a request through the provider's own pieces with
modelled costs: routing (`engine.planner.routing`) drawn per token from each layer's expert
popularity (uniform unless a recorded one is given) and its reuse of the request's earlier experts,
or replayed call by call from a recorded run's trace, the pool's own
eviction policy (`engine.experts.pool.ExpertPool`) deciding hits and misses, and each MoE layer's
experts ordered and timed by the InfMoE code the provider runs (`engine.experts.order`: Johnson's
order under the slot limit, one link, one compute unit), with α (expert compute) and β (expert
read: its bytes at the link's rate, the provider's bookkeeping, and the read's latency and the
provider's hand-offs, shared by the reads in flight together) from the hardware profile's rates,
α slowed by the profile's measured `read_contention` in layers that read (on few cores the
reader's threads take CPU from the matmuls). Dense work is a roofline per matrix (the slower of
streaming the weight and the arithmetic, plus the call's fixed cost) plus the engine's measured
per-block overheads.

Modelled: strict offloading (O_DIRECT reads on CPU, pinned host or disk over the host link on a
GPU), teacher-forced steps, and prefetch where the precision of the provider's predictions is given
(`engine.planner.replay`: the guessed loads its rule makes, right as often as that precision says).
Not modelled: the page-cache mode (bounded by the kernel, not the budget), sampling and
detokenising, other processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.pool import ExpertPool
from engine.memory_plan import MachineMemory, MemoryPlan, plan_memory
from engine.model import MoELayerKey
from engine.planner.profile import FORMATS, HardwareProfile, MatmulRates
from engine.planner.replay import Costs, Replay
from engine.planner.routing import Routing, RoutingTrace
from engine.sizes import format_bytes
from engine.summary import summarize
from engine.weights.quantize import QUANTIZATION_KEY, ExpertFormat, dense_record

#: Expert formats the planner knows: as stored (a float dtype) or quantised; a profile rates each.
EXPERT_FORMATS = FORMATS
DENSE_FORMATS = ("float32", "bfloat16", "int8")
#: RSS a process holds beyond weights, pool and KV cache (Python, torch, oneDNN caches, I/O threads'
#: arenas): the slack `bench.fullscale` states and holds to (NLLB-MoE 54B: 0.9 GiB measured).
SLACK_BYTES = 3 << 29


@dataclass(frozen=True, kw_only=True)
class PlanCase:
    """One configuration to predict."""

    batch: int
    """Requests decoded together."""
    budget: str
    """`--expert-memory`: a size (`4GiB`) or a share of all experts (`25%`)."""
    experts: str = "bfloat16"
    """How experts are stored and computed (`EXPERT_FORMATS`)."""
    group_size: int = 128
    """Inputs per scale of int4 experts."""
    dense: str = "bfloat16"
    """How the dense weights are computed (`DENSE_FORMATS`; float ones are also the compute dtype)."""
    source_len: int = 32
    """Input tokens per request."""
    warmup: int = 16
    """Decode steps before the warm steps are counted (the pool settling after the encoder pass)."""
    steps: int = 16
    """Decode steps averaged, cold (right after the encoder pass) and warm."""
    window: int = 4
    """Expert loads in flight (`--expert-window`)."""
    seed: int = 0
    """Of the drawn routing."""

    def __post_init__(self) -> None:
        if self.batch < 1 or self.source_len < 1 or self.steps < 1 or self.warmup < 0 or self.window < 1:
            raise ConfigError("plan: batch, source length, steps and window must be >= 1 and warmup >= 0")
        if self.experts not in EXPERT_FORMATS:
            raise ConfigError(f"--experts {self.experts}: unknown; one of {', '.join(EXPERT_FORMATS)}")
        if self.dense not in DENSE_FORMATS:
            raise ConfigError(f"--dense {self.dense}: unknown; one of {', '.join(DENSE_FORMATS)}")

    @property
    def compute_dtype(self) -> str:
        """Activations' dtype: the dense format when it is a float one, else bfloat16."""
        return "bfloat16" if self.dense == "int8" else self.dense


@dataclass(frozen=True)
class StepEstimate:
    """A decode step, averaged over the steps it covers."""

    step_seconds: float
    dense_seconds: float
    expert_compute_seconds: float
    expert_read_seconds: float
    """Time the link (disk, or host-to-device copies) is busy with expert loads."""
    stall_seconds: float
    """Time compute waits on loads."""
    hit_rate: float
    bytes_read_per_step: float
    batch: int

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.step_seconds

    @property
    def bytes_read_per_token(self) -> float:
        return self.bytes_read_per_step / self.batch

    @property
    def bound_by(self) -> str:
        """`reads` when the link is busier than the compute, else `compute`."""
        return "reads" if self.expert_read_seconds > self.dense_seconds + self.expert_compute_seconds else "compute"

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "tokens_per_second": self.tokens_per_second,
            "bytes_read_per_token": self.bytes_read_per_token,
            "bound_by": self.bound_by,
        }


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the process holds on the device that computes (RAM on CPU, device memory on a GPU)."""

    dense_bytes: int
    pool_bytes: int
    staging_bytes: int
    kv_cache_bytes: int
    slack_bytes: int
    limit_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.pool_bytes + self.staging_bytes + self.kv_cache_bytes + self.slack_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.limit_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


@dataclass(frozen=True)
class Prediction:
    case: PlanCase
    device: str
    memory: MemoryEstimate
    plan: MemoryPlan
    encode_seconds: float
    cold: StepEstimate
    warm: StepEstimate
    problems: list[str] = field(default_factory=list)
    """Why it cannot run as asked (empty when it can)."""

    first_step_seconds: float = 0.0

    @property
    def ttft_seconds(self) -> float:
        """Time to the first token: the encoder pass and the first decode step."""
        return self.encode_seconds + self.first_step_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": dataclasses.asdict(self.case),
            "device": self.device,
            "runs": not self.problems,
            "problems": self.problems,
            "memory": self.memory.to_dict(),
            "pool_slots": self.plan.num_slots,
            "store_bytes": self.plan.store_bytes,
            "bytes_per_expert": self.plan.bytes_per_expert,
            "encode_seconds": self.encode_seconds,
            "ttft_seconds": self.ttft_seconds,
            "cold": self.cold.to_dict(),
            "warm": self.warm.to_dict(),
        }


def quantized_config(config: ModelConfig, case: PlanCase) -> tuple[ModelConfig, torch.dtype]:
    """`config` as `cpm2 init` / `cpm2 quantize` would record `case`'s formats, and the store dtype."""
    record: dict[str, Any] = {}
    store_dtype = getattr(torch, case.compute_dtype)
    if case.experts in ("int8", "int4"):
        fmt = ExpertFormat.choose(config, case.experts, group_size=case.group_size if case.experts == "int4" else None)
        record.update(fmt.record())
        store_dtype = fmt.store_dtype
    elif case.experts != case.compute_dtype:
        raise ConfigError(
            f"--experts {case.experts} with --dense {case.dense}: float experts compute in the dense "
            f"dtype ({case.compute_dtype}); pass --experts {case.compute_dtype}, int8 or int4"
        )
    if case.dense == "int8":
        record.update(dense_record("int8"))
    if not record:
        return config, store_dtype
    return config.replace(extra={**config.extra, QUANTIZATION_KEY: record}), store_dtype


def _rates(profile: HardwareProfile) -> dict[str, MatmulRates]:
    return profile.gpu.matmul if profile.gpu is not None else profile.cpu


def _costs(config: ModelConfig, profile: HardwareProfile, case: PlanCase, plan: MemoryPlan) -> Costs:
    rates = _rates(profile)
    act = getattr(torch, case.compute_dtype).itemsize
    dense_bpp = 1.0 if case.dense == "int8" else float(act)
    parameters = config.d_ff * (3 if config.is_gated_ffn else 2) * config.d_model
    link_gb_s = profile.disk_read_gb_s
    latency = profile.disk_latency_us * 1e-6
    if profile.gpu is not None:
        host_holds_store = plan.host_tier == "pinned"
        link_gb_s = profile.gpu.h2d_gb_s if host_holds_store else min(profile.gpu.h2d_gb_s, profile.disk_read_gb_s)
        latency = 0.0 if host_holds_store else latency
    blob = plan.store_bytes / max(1, plan.num_experts)
    serial, overlapping = profile.overhead.load_parts()
    return Costs(
        dense=rates[case.dense],
        experts=rates[case.experts],
        dense_bytes_per_parameter=dense_bpp,
        act_bytes=act,
        memcpy_gb_s=profile.memcpy_gb_s,
        load_latency_seconds=latency + overlapping,
        load_link_seconds=serial + blob / (link_gb_s * 1e9),
        expert_call_seconds=profile.overhead.expert_us * 1e-6,
        read_contention=profile.read_contention if profile.gpu is None else 1.0,
        expert_parameters=parameters,
        expert_bytes=plan.bytes_per_expert,
        blob_bytes=blob,
        expert_matrices=3 if config.is_gated_ffn else 2,
    )


def _matmul(rates: MatmulRates, *, rows: int, out_features: int, in_features: int, bytes_per_parameter: float) -> float:
    parameters = out_features * in_features
    return rates.seconds(rows=rows, weight_bytes=parameters * bytes_per_parameter, parameters=parameters)


def _ffn_seconds(config: ModelConfig, c: Costs, rows: int) -> float:
    d, f = config.d_model, config.d_ff
    shapes = [(f, d)] * (2 if config.is_gated_ffn else 1) + [(d, f)]
    return sum(
        _matmul(c.dense, rows=rows, out_features=o, in_features=i, bytes_per_parameter=c.dense_bytes_per_parameter)
        for o, i in shapes
    )


def _attention_seconds(config: ModelConfig, c: Costs, *, rows: int, keys: int, cross: bool) -> float:
    """Projections (self: fused q/k/v and output; cross: query and output, its keys and values are
    computed once per request) and the score/value products over `keys` cached positions per row."""
    d, inner = config.d_model, config.num_heads * config.d_kv
    shapes = [(inner, d), (d, inner)] if cross else [(3 * inner, d), (d, inner)]
    seconds = sum(
        _matmul(c.dense, rows=rows, out_features=o, in_features=i, bytes_per_parameter=c.dense_bytes_per_parameter)
        for o, i in shapes
    )
    kv_bytes = rows * keys * 2 * inner * c.act_bytes
    return seconds + kv_bytes / (c.memcpy_gb_s * 1e9)


def _moe_layers(config: ModelConfig, stack: str) -> list[int]:
    if config.moe is None:
        return []
    return list(config.moe.encoder_layers if stack == "encoder" else config.moe.decoder_layers)


def _encode_seconds(config: ModelConfig, c: Costs, replay: Replay, profile: HardwareProfile, case: PlanCase) -> float:
    rows = case.batch * case.source_len
    before = _attention_seconds(config, c, rows=rows, keys=case.source_len, cross=False)
    before += profile.overhead.block_seconds(rows)
    seconds = _stack(config, c, replay, profile, "encoder", rows=rows, before=before)
    # Every decoder block's cross-attention keys and values, once per request.
    inner = config.num_heads * config.d_kv
    keys_values = config.num_decoder_layers * _matmul(
        c.dense,
        rows=rows,
        out_features=2 * inner,
        in_features=config.d_model,
        bytes_per_parameter=c.dense_bytes_per_parameter,
    )
    return seconds + replay.advance(keys_values)


@dataclass
class _Totals:
    """Seconds and loads summed over decode steps."""

    steps: int = 0
    step: float = 0.0
    dense: float = 0.0
    compute: float = 0.0
    transfer: float = 0.0
    stall: float = 0.0
    loads: int = 0
    hits: int = 0
    looked: int = 0


def _stack(
    config: ModelConfig,
    c: Costs,
    replay: Replay,
    profile: HardwareProfile,
    stack: Literal["encoder", "decoder"],
    *,
    rows: int,
    before: float,
    into: _Totals | None = None,
) -> float:
    """A stack's blocks in order, their seconds: `before` the dense work ahead of each block's feed-
    forward, then its dense feed-forward or its MoE layer (replayed, plus the layer's own overhead).
    Dense work advances the replay's clock, so guessed loads land as they would; each MoE layer is
    told the next one and the dense work before it. Dense and MoE seconds and the calls' counts are
    added to `into`."""
    into = into if into is not None else _Totals()
    blocks = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    moe = _moe_layers(config, stack)
    ffn = _ffn_seconds(config, c, rows)
    moe_seconds = profile.overhead.moe_layer_us * 1e-6
    dense = expert = 0.0
    if moe:
        # The provider guesses the first MoE layer's experts from the stack's input.
        first = min(moe)
        made = replay.anticipate((MoELayerKey(stack, first), first * (before + ffn) + before), rows)
        into.transfer += made * c.guess_seconds
        into.loads += made
    for block in range(blocks):
        dense += replay.advance(before)
        if block not in moe:
            dense += replay.advance(ffn)
            continue
        following = [b for b in moe if b > block]
        ahead = None
        if following:
            # This layer's overhead, the blocks in between, and the next one's dense work ahead of it.
            between = (following[0] - block - 1) * (before + ffn)
            ahead = (MoELayerKey(stack, following[0]), moe_seconds + between + before)
        call = replay.layer(MoELayerKey(stack, block), rows, ahead=ahead)
        dense += replay.advance(moe_seconds)
        expert += call.makespan
        into.compute += call.compute
        into.transfer += call.transfer
        into.stall += call.stall
        into.loads += call.loads
    into.dense += dense
    into.step += dense + expert
    return dense + expert


def _step(
    config: ModelConfig,
    c: Costs,
    replay: Replay,
    profile: HardwareProfile,
    case: PlanCase,
    *,
    position: int,
    into: _Totals,
) -> float:
    """One decode step at `position` added to `into`; returns its seconds."""
    rows = case.batch
    hits, looked = replay.hits, replay.looked
    overhead = replay.advance(profile.overhead.step_us * 1e-6)
    before = (
        _attention_seconds(config, c, rows=rows, keys=position + 1, cross=False)
        + _attention_seconds(config, c, rows=rows, keys=case.source_len, cross=True)
        + profile.overhead.block_seconds(rows)
    )
    seconds = _stack(config, c, replay, profile, "decoder", rows=rows, before=before, into=into)
    logits = _matmul(
        c.dense,
        rows=rows,
        out_features=config.vocab_size,
        in_features=config.d_model,
        bytes_per_parameter=c.dense_bytes_per_parameter,
    )
    logits = replay.advance(logits)
    into.steps += 1
    into.step += overhead + logits
    into.dense += overhead + logits
    into.hits += replay.hits - hits
    into.looked += replay.looked - looked
    return overhead + seconds + logits


def predict(
    config: ModelConfig,
    profile: HardwareProfile,
    case: PlanCase,
    *,
    popularity: dict[str, list[float]] | None = None,
    prior: float = 1.0,
    reuse: Mapping[str, float] | None = None,
    concentration: Mapping[str, float] | None = None,
    trace: RoutingTrace | None = None,
    precision: Mapping[str, float] | None = None,
) -> Prediction:
    """Memory, time to first token and decode speed of `config` on `profile` as `case` says.

    `popularity`: tokens (or any weights) per expert of each MoE layer, keyed like `decoder.3`
    (`bench.fullscale` and `bench.offload` record them); uniform routing where absent. A recording
    is a sample, and a short one has seen few of the experts: drawing from it alone would send every
    future token to those, so `prior` tokens are added to every expert's count (a uniform prior).

    `reuse`: per MoE layer, the share of a call's expert choices that go to experts the request's
    earlier calls of the layer chose, in proportion to their tokens (`routing_reuse` measures it on
    a recorded trace); 0 where absent: every call drawn afresh from the popularity.

    `concentration`: per MoE layer, how alike a request's tokens in one call (its encoder pass)
    route, the Dirichlet concentration α of its expert preferences (`routing_concentration` fits it
    to a recorded trace); absent: each token drawn on its own, an upper bound on an encoder pass's
    reads.

    `trace`: a recorded run's routing, replayed call by call instead of drawn (the encoder pass's
    calls first, then the decode steps': the first `case.steps` are the cold steps, those from
    max(`case.warmup`, `case.steps`) on the warm ones); layer calls beyond it are drawn as above.
    This is how the planner is checked against real runs (`bench.plan_validation`): the routing of
    a model with random routers is a property of its weights, not something the planner can know,
    and replaying it leaves the error that is the planner's own.

    `precision`: per MoE layer, the share of the provider's predictions of its experts that were
    right (`engine.planner.replay`); the provider's guessed loads for a layer are replayed only
    where it has one (absent: as with prefetch off).
    """
    if config.moe is None:
        raise ConfigError("cpm2 plan models offloaded experts; this config has none (cpm2 info sizes dense models)")
    qconfig, store_dtype = quantized_config(config, case)
    device = torch.device("cuda" if profile.gpu is not None else "cpu")
    limit = profile.gpu.memory_bytes if profile.gpu is not None else profile.ram_bytes
    compute_dtype = getattr(torch, case.compute_dtype)
    summary = summarize(qconfig, compute_dtype)
    plan = plan_memory(
        qconfig,
        dtype=compute_dtype,
        device=device,
        expert_memory=case.budget,
        window=case.window,
        host_tier="auto",
        store_dtype=store_dtype,
        machine=MachineMemory(auto_budget_bytes=None, host_ram_bytes=profile.ram_bytes),
        summary=summary,
    )
    problems = []
    if plan.is_too_small:
        problems.append(
            f"--expert-memory {case.budget} holds fewer than 2 experts (minimum {format_bytes(plan.min_budget_bytes)})"
        )
    act = getattr(torch, case.compute_dtype).itemsize
    dense_params = summary.dense_parameters
    embed = config.vocab_size * config.d_model
    if case.dense == "int8":
        # Linears in int8 (a scale per row aside); the embedding lookup keeps its float matrix, and a
        # tied head gets its own int8 copy (`engine.weights.loader.quantize_dense`).
        dense_bytes = (dense_params - embed) + embed * act + (embed if config.tie_word_embeddings else 0)
    else:
        dense_bytes = dense_params * act
    inner = config.num_heads * config.d_kv
    positions = case.source_len + case.warmup + case.steps
    kv = case.batch * inner * 2 * act * (config.num_decoder_layers * (positions + case.source_len))
    memory = MemoryEstimate(
        dense_bytes=dense_bytes,
        pool_bytes=plan.pool_bytes if plan.is_offloaded else plan.expert_bytes,
        staging_bytes=plan.staging_bytes,
        kv_cache_bytes=kv,
        slack_bytes=SLACK_BYTES if profile.gpu is None else 0,
        limit_bytes=limit,
    )
    if not memory.fits:
        where = "device memory" if profile.gpu is not None else "RAM"
        problems.append(f"needs {format_bytes(memory.total_bytes)} of {where}, the machine has {format_bytes(limit)}")
    costs = _costs(qconfig, profile, case, plan)
    routing = Routing.create(
        config.moe,
        seed=case.seed,
        popularity=popularity,
        prior=prior,
        reuse=reuse,
        concentration=concentration,
        trace=trace,
    )
    slots = plan.num_slots if plan.is_offloaded else plan.num_experts
    pool = ExpertPool(max(1, slots))
    replay = Replay(
        costs,
        pool,
        case.window,
        routing,
        requests=case.batch,
        resident=not plan.is_offloaded,
        precision=dict(precision or {}),
        guesser=np.random.default_rng(case.seed),
    )
    encode = _encode_seconds(qconfig, costs, replay, profile, case)
    first = _Totals()
    first_step = _step(qconfig, costs, replay, profile, case, position=0, into=first)
    cold = _average(qconfig, costs, replay, profile, case, positions=range(1, case.steps), start=first)
    for position in range(case.steps, case.warmup):  # the pool settles
        _step(qconfig, costs, replay, profile, case, position=position, into=_Totals())
    begin = max(case.warmup, case.steps)
    warm = _average(qconfig, costs, replay, profile, case, positions=range(begin, begin + case.steps))
    return Prediction(case, str(device), memory, plan, encode, cold, warm, problems, first_step)


def _average(
    config: ModelConfig,
    costs: Costs,
    replay: Replay,
    profile: HardwareProfile,
    case: PlanCase,
    *,
    positions: range,
    start: _Totals | None = None,
) -> StepEstimate:
    """The decode steps at `positions` (after those already in `start`), averaged."""
    totals = start or _Totals()
    for position in positions:
        _step(config, costs, replay, profile, case, position=position, into=totals)
    n = max(1, totals.steps)
    return StepEstimate(
        step_seconds=totals.step / n,
        dense_seconds=totals.dense / n,
        expert_compute_seconds=totals.compute / n,
        expert_read_seconds=totals.transfer / n,
        stall_seconds=totals.stall / n,
        hit_rate=totals.hits / totals.looked if totals.looked else math.nan,
        bytes_read_per_step=totals.loads * costs.blob_bytes / n,
        batch=case.batch,
    )
