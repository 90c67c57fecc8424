"""`cpm2 plan`: hardware profiles, the prediction's output and its monotonic sense, the CLI.

What is checked is the planner's output and that it follows the provider's rules (a bigger budget
hits more and reads less, int4 reads less than bf16, a budget too small or a machine too small is
said plainly), not its accuracy: `bench/plan_validation.py` measures that against real runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cpm2.cli import main
from engine.errors import ConfigError
from engine.experts.pool import ExpertPool
from engine.model import MoELayerKey
from engine.planner.measure import MeasureOptions, measure_profile
from engine.planner.predict import PlanCase, predict
from engine.planner.profile import (
    HardwareProfile,
    MatmulRates,
    OverheadProfile,
    load_profile,
    overlapping_part,
    reference_profiles,
)
from engine.planner.routing import Routing, routing_concentration, routing_reuse
from engine.weights.loader import inspect_config

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
SWITCH_BASE_8 = CONFIGS / "switch-base-8"


def _profile(**changes: object) -> HardwareProfile:
    rates = MatmulRates(gemv_gb_s=20.0, gemv16_gb_s=15.0, small_gemv_gb_s=12.0, tflops=1.0, call_us=20.0)
    settings: dict[str, object] = {
        "name": "test",
        "source": "made up for the tests",
        "cpu_cores": 2,
        "ram_bytes": 24 << 30,
        "memcpy_gb_s": 8.0,
        "disk_read_gb_s": 1.5,
        "disk_latency_us": 100.0,
        "cpu": dict.fromkeys(("float32", "bfloat16", "int8", "int4"), rates),
        "overhead": OverheadProfile(step_us=200, block_us=100, moe_layer_us=150, expert_us=60, load_us=60),
        **changes,
    }
    return HardwareProfile(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def switch8():  # type: ignore[no-untyped-def]
    return inspect_config(SWITCH_BASE_8).config


def test_profiles_round_trip_and_refuse_what_they_cannot_use(tmp_path: Path) -> None:
    profile = _profile()
    path = tmp_path / "p.json"
    profile.save(path)
    assert load_profile(path) == profile
    data = json.loads(path.read_text())
    del data["cpu"]["int4"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="missing \\['int4'\\]"):
        load_profile(path)
    with pytest.raises(ConfigError, match="disk_read_gb_s must be > 0"):
        _profile(disk_read_gb_s=0.0)
    with pytest.raises(ConfigError, match="read_contention must be in"):
        _profile(read_contention=0.5)
    with pytest.raises(ConfigError, match="shipped: "):
        load_profile("no-such-machine")


def test_shipped_profiles_load_and_name_their_sources() -> None:
    shipped = reference_profiles()
    assert len(shipped) >= 3
    for name in shipped:
        profile = load_profile(name)
        assert profile.source
        assert profile.name == name
    assert any(load_profile(name).gpu is not None for name in shipped)


def test_pool_record_use_counts_hits_and_evicts_by_policy() -> None:
    key = MoELayerKey("decoder", 1)
    pool = ExpertPool(2, policy="lru")
    assert pool.record_use((key, 0)) is False
    assert pool.record_use((key, 1)) is False
    assert pool.record_use((key, 0)) is True
    assert pool.record_use((key, 2)) is False  # evicts 1, the least recently used
    assert (key, 1) not in pool
    assert (key, 0) in pool
    assert pool.record_use((key, 3), upcoming=[(key, 0)]) is False  # 0 is still needed: 2 goes
    assert (key, 0) in pool
    assert (key, 2) not in pool


def test_prediction_follows_the_budget_format_and_batch(switch8) -> None:  # type: ignore[no-untyped-def]
    profile = _profile()

    def run(**case: object):  # type: ignore[no-untyped-def]
        return predict(switch8, profile, PlanCase(**{"batch": 1, "budget": "25%", **case}))  # type: ignore[arg-type]

    small, large = run(budget="12.5%"), run(budget="50%")
    assert small.warm.hit_rate < large.warm.hit_rate
    assert small.warm.bytes_read_per_token > large.warm.bytes_read_per_token
    assert small.warm.tokens_per_second < large.warm.tokens_per_second
    bf16, int4 = run(), run(experts="int4")
    assert int4.warm.bytes_read_per_token < bf16.warm.bytes_read_per_token / 3
    same_bytes = run(budget="200MiB"), run(budget="200MiB", experts="int4")
    assert same_bytes[1].plan.num_slots > 3 * same_bytes[0].plan.num_slots  # 3.6x the experts in as many bytes
    assert same_bytes[1].warm.hit_rate > same_bytes[0].warm.hit_rate
    one, sixteen = run(), run(batch=16)
    assert sixteen.warm.tokens_per_second > one.warm.tokens_per_second
    assert sixteen.encode_seconds > one.encode_seconds
    for p in (small, large, bf16, int4, one, sixteen):
        assert not p.problems
        assert p.ttft_seconds > p.encode_seconds > 0
        assert p.warm.step_seconds >= p.warm.dense_seconds
        assert p.memory.pool_bytes == p.plan.num_slots * p.plan.bytes_per_expert
    report = one.to_dict()
    assert {"memory", "ttft_seconds", "cold", "warm", "pool_slots"} <= set(report)
    assert json.loads(json.dumps(report)) == report


def test_a_blocks_own_time_follows_the_rows_it_touches(switch8) -> None:  # type: ignore[no-untyped-def]
    measured = OverheadProfile(step_us=200, block_us=100, block16_us=250, moe_layer_us=150, expert_us=60, load_us=60)
    assert measured.block_seconds(1) == pytest.approx(100e-6)
    assert measured.block_seconds(8) == pytest.approx((100 + 150 * 7 / 15) * 1e-6)
    assert measured.block_seconds(16) == measured.block_seconds(512) == pytest.approx(250e-6)
    older = dataclasses.replace(measured, block16_us=None)  # profiles measured before block16_us
    assert older.block_seconds(1) == older.block_seconds(16) == pytest.approx(100e-6)
    with pytest.raises(ConfigError, match="block16_us must be >= 0"):
        dataclasses.replace(measured, block16_us=-1.0)
    # Batch 16 decodes 12 decoder blocks (Switch-base-8): 12 x 150 us more per step than with the old
    # figure; batch 1 is as before.
    for batch, extra in ((1, 0.0), (16, 12 * 150e-6)):
        case = PlanCase(batch=batch, budget="100%")
        new = predict(switch8, _profile(overhead=measured), case).warm.dense_seconds
        old = predict(switch8, _profile(overhead=older), case).warm.dense_seconds
        assert new - old == pytest.approx(extra)


def test_reads_slow_the_experts_of_layers_that_load_and_latency_overlaps(switch8) -> None:  # type: ignore[no-untyped-def]
    def run(profile: HardwareProfile, budget: str = "25%", batch: int = 1):  # type: ignore[no-untyped-def]
        return predict(switch8, profile, PlanCase(batch=batch, budget=budget))

    calm, contended = run(_profile()), run(_profile(read_contention=2.0))
    assert contended.warm.expert_compute_seconds > 1.5 * calm.warm.expert_compute_seconds
    assert contended.warm.dense_seconds == calm.warm.dense_seconds
    resident = run(_profile(), "100%"), run(_profile(read_contention=2.0), "100%")
    assert resident[0].warm.expert_read_seconds == 0
    assert resident[1].warm.expert_compute_seconds == resident[0].warm.expert_compute_seconds
    # A second of latency per read: paid in full by a lone load (batch 1: ~1 load a layer), shared
    # by the reads in flight together when a layer loads many (a 16-row batch, an encoder pass).
    slow = _profile(disk_latency_us=1e6)
    for batch in (1, 16):
        base, late = run(_profile(), batch=batch), run(slow, batch=batch)
        loads = base.warm.bytes_read_per_step / base.plan.store_bytes * base.plan.num_experts
        extra = (late.warm.expert_read_seconds - base.warm.expert_read_seconds) / loads
        assert extra == pytest.approx(1.0 if batch == 1 else 0.25, rel=0.35)


def test_the_providers_hand_offs_overlap_between_loads_in_flight(switch8) -> None:  # type: ignore[no-untyped-def]
    # load_us 400 alone, 175 per load with 4 in flight: s + o = 400, s + o / 4 = 175 -> o 300, s 100.
    measured = OverheadProfile(
        step_us=200, block_us=100, moe_layer_us=150, expert_us=60, load_us=400, load_window_us=175
    )
    assert measured.load_parts() == pytest.approx((100e-6, 300e-6))
    older = dataclasses.replace(measured, load_window_us=None)  # profiles measured before it was
    assert older.load_parts() == pytest.approx((400e-6, 0.0))
    with pytest.raises(ConfigError, match="load_window_us must be >= 0"):
        dataclasses.replace(measured, load_window_us=-1.0)
    # What `provider_load_us` solves at the loads in flight it saw: 2 in flight, 250 a load -> o 300.
    assert overlapping_part(400, 250, in_flight=2) == pytest.approx(300)
    assert overlapping_part(400, 400, in_flight=4) == overlapping_part(400, 100, in_flight=1) == 0
    assert overlapping_part(400, 0, in_flight=4) == 400  # s >= 0: o at most the whole

    def run(overhead: OverheadProfile, batch: int, window: int = 4):  # type: ignore[no-untyped-def]
        return predict(switch8, _profile(overhead=overhead), PlanCase(batch=batch, budget="25%", window=window))

    # An encoder pass queues dozens of loads a layer: each pays 175 us of the provider's time, not
    # 400. A batch-1 decode step loads one expert a layer: as before.
    for batch in (1, 16):
        new, old = run(measured, batch), run(older, batch)
        assert new.encode_seconds < old.encode_seconds
    one = run(measured, 1), run(older, 1)
    assert one[0].warm.expert_read_seconds == pytest.approx(one[1].warm.expert_read_seconds)
    # A second of the provider's time a load, 0.2 s of it serial: paid in full by a lone load, 0.2 +
    # 0.8 / 4 by the loads of a 16-row batch with 4 in flight, in full again with 1 in flight.
    slow = OverheadProfile(step_us=200, block_us=100, moe_layer_us=150, expert_us=60, load_us=1e6, load_window_us=4e5)
    for batch, window, per_load in ((1, 4, 1.0), (16, 4, 0.4), (16, 1, 1.0)):
        base, late = run(older, batch, window), run(slow, batch, window)
        loads = base.warm.bytes_read_per_step / base.plan.store_bytes * base.plan.num_experts
        extra = (late.warm.expert_read_seconds - base.warm.expert_read_seconds) / loads
        assert extra == pytest.approx(per_load, rel=0.35)


def test_recorded_routing_changes_the_hit_rate(switch8) -> None:  # type: ignore[no-untyped-def]
    moe = switch8.moe
    skewed = {f"decoder.{layer}": [100.0] + [1.0] * (moe.num_experts - 1) for layer in moe.decoder_layers}
    case = PlanCase(batch=1, budget="25%")
    uniform = predict(switch8, _profile(), case)
    popular = predict(switch8, _profile(), case, popularity=skewed)
    assert popular.warm.hit_rate > uniform.warm.hit_rate
    # Without a prior, a layer recorded with no tokens at all is still drawn from (evenly).
    unseen = {f"decoder.{layer}": [0.0] * moe.num_experts for layer in moe.decoder_layers}
    assert predict(switch8, _profile(), case, popularity=unseen, prior=0).warm.tokens_per_second > 0


def test_a_recorded_trace_is_replayed_call_by_call(switch8) -> None:  # type: ignore[no-untyped-def]
    """Each layer call takes the next recorded call of its layer, whatever the draw would have been:
    one expert needed again and again is read once and then hit; every layer cycling through its 8
    experts (48 decoder experts, a 25 % budget of 24 slots) misses every time."""
    moe = switch8.moe
    calls = 200  # more than the case's cold, settling and warm steps

    def trace(expert_of_call):  # type: ignore[no-untyped-def]
        return {f"decoder.{layer}": [[(expert_of_call(i), 1)] for i in range(calls)] for layer in moe.decoder_layers}

    case = PlanCase(batch=1, budget="25%")
    same = predict(switch8, _profile(), case, trace=trace(lambda i: 0))
    assert same.warm.hit_rate == 1.0
    assert same.warm.bytes_read_per_step == 0
    assert same.warm.stall_seconds == 0
    cycling = trace(lambda i: i % moe.num_experts)
    fresh = predict(switch8, _profile(), case, trace=cycling)
    assert fresh.warm.hit_rate == 0
    assert predict(switch8, _profile(), case).warm.hit_rate > 0  # drawn, some calls hit
    # Every decoder call replayed: the draws' seed no longer matters to the decode steps.
    reseeded = predict(switch8, _profile(), dataclasses.replace(case, seed=case.seed + 1), trace=cycling)
    assert reseeded.warm == fresh.warm


def test_reuse_is_measured_from_a_trace_and_drawn_with(switch8) -> None:  # type: ignore[no-untyped-def]
    """`routing_reuse` finds how much a layer's calls return to experts chosen earlier, beyond what
    its popularity explains; drawn with it, a request keeps to its experts and hits the pool more."""
    moe = switch8.moe
    uniform = [1.0] * moe.num_experts
    always = [[(3, 1)] for _ in range(40)]  # the same expert every call
    cycling = [[(i % moe.num_experts, 1)] for i in range(40)]  # each expert in turn
    layers = {"decoder.1": always, "decoder.3": cycling, "encoder.1": [[(0, 4), (5, 2)]]}
    reuse = routing_reuse(layers, dict.fromkeys(layers, uniform), prior=0)
    assert reuse["decoder.1"] == pytest.approx(1.0)  # o = 1 on every call
    # Cycling returns to seen experts only once all 8 were seen: less than popularity alone explains.
    assert reuse["decoder.3"] == 0.0
    assert "encoder.1" not in reuse  # called once: nothing to reuse
    # Calls made the way `predict` draws them (half the time an expert chosen before, in proportion
    # to its calls; else any, evenly): the estimate finds the half back.
    generator = torch.Generator().manual_seed(0)
    made: list[int] = []
    for _ in range(2000):
        earlier = made and torch.rand((), generator=generator) < 0.5
        pool = made if earlier else range(moe.num_experts)
        made.append(pool[int(torch.randint(len(pool), (), generator=generator))])
    drawn = {"decoder.1": [[(e, 1)] for e in made]}
    assert routing_reuse(drawn, {"decoder.1": uniform}, prior=0)["decoder.1"] == pytest.approx(0.5, abs=0.05)

    case = PlanCase(batch=1, budget="25%")
    sticky = {f"decoder.{layer}": 0.9 for layer in moe.decoder_layers}
    fresh, kept = predict(switch8, _profile(), case), predict(switch8, _profile(), case, reuse=sticky)
    assert kept.warm.hit_rate > fresh.warm.hit_rate
    assert kept.warm.bytes_read_per_step < fresh.warm.bytes_read_per_step
    assert predict(switch8, _profile(), case, reuse={}).warm == fresh.warm  # no reuse: as before
    with pytest.raises(ConfigError, match="not a share in"):
        predict(switch8, _profile(), case, reuse={"decoder.1": 1.5})


def test_concentration_is_fitted_to_an_encoder_pass_and_drawn_with(switch8) -> None:  # type: ignore[no-untyped-def]
    """`routing_concentration` finds how alike a request's tokens route in one call from the
    distinct experts its recording touched; drawn with it, an encoder pass touches as many, and
    reads less than independent tokens would."""
    moe = switch8.moe
    uniform = [1.0] * moe.num_experts
    # Two requests of 16 tokens, each request's tokens on two experts: 4 of 8 touched, where 32
    # independent tokens over 8 experts touch nearly all.
    clumped = [[(0, 9), (1, 7), (4, 10), (6, 6)]]
    spread = [[(e, 4) for e in range(moe.num_experts)]]
    steps = [[(2, 1), (5, 1)] for _ in range(4)]  # decode steps: one token of each request
    trace = {"encoder.1": clumped, "encoder.3": spread, "decoder.1": steps}
    alpha = routing_concentration(trace, dict.fromkeys(trace, uniform), top_k=moe.top_k, requests=2)
    assert set(alpha) == {"encoder.1"}  # spread: as independent as it gets; decode: nothing shared
    assert 0 < alpha["encoder.1"] < 10
    routing = Routing.create(moe, seed=7, popularity={"encoder.1": uniform}, concentration=alpha)
    touched = [len(routing.next_call("encoder.1", 32, 2)) for _ in range(200)]
    assert sum(touched) / len(touched) == pytest.approx(4, abs=0.5)
    assert sum(n for _, n in routing.next_call("encoder.1", 32, 2)) == 32 * moe.top_k

    case = PlanCase(batch=4, budget="25%", source_len=32)
    shared = dict.fromkeys((f"encoder.{layer}" for layer in moe.encoder_layers), 0.5)
    alone, together = predict(switch8, _profile(), case), predict(switch8, _profile(), case, concentration=shared)
    assert together.encode_seconds < alone.encode_seconds
    with pytest.raises(ConfigError, match="must be > 0"):
        predict(switch8, _profile(), case, concentration={"encoder.1": 0.0})


def test_what_cannot_run_is_said(switch8) -> None:  # type: ignore[no-untyped-def]
    tiny_ram = predict(switch8, _profile(ram_bytes=1 << 30), PlanCase(batch=1, budget="25%"))
    assert any("of RAM" in p for p in tiny_ram.problems)
    too_small = predict(switch8, _profile(), PlanCase(batch=1, budget="1MiB"))
    assert any("fewer than 2 experts" in p for p in too_small.problems)
    with pytest.raises(ConfigError, match="float experts compute in the dense dtype"):
        predict(switch8, _profile(), PlanCase(batch=1, budget="25%", experts="float32"))
    with pytest.raises(ConfigError, match="--experts int3"):
        PlanCase(batch=1, budget="25%", experts="int3")


def test_a_gpu_profile_plans_device_memory(switch8) -> None:  # type: ignore[no-untyped-def]
    h100 = load_profile("h100-pcie-nvme")
    assert h100.gpu is not None
    p = predict(switch8, h100, PlanCase(batch=1, budget="25%"))
    assert p.device == "cuda"
    assert p.memory.limit_bytes == h100.gpu.memory_bytes
    assert not p.problems


def test_cli_plans_lists_and_measures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "test.json"
    _profile().save(profile)
    args = ["plan", "--config", str(SWITCH_BASE_8), "--hardware", str(profile), "--experts", "bfloat16", "int4"]
    assert main([*args, "--budget", "25%", "--batch", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["case"]["experts"] for p in report["predictions"]] == ["bfloat16", "int4"]
    assert main([*args, "--budget", "25%", "--batch", "1", "--json", "--reuse", "0.9"]) == 0
    sticky = json.loads(capsys.readouterr().out)
    assert sticky["predictions"][0]["warm"]["hit_rate"] > report["predictions"][0]["warm"]["hit_rate"]
    assert main([*args, "--reuse", "-0.1"]) == 2
    assert "--reuse -0.1: a share in [0, 1]" in capsys.readouterr().err
    assert main([*args, "--budget", "25%", "--batch", "4", "--json", "--concentration", "0.5"]) == 0
    together = json.loads(capsys.readouterr().out)
    assert main([*args, "--budget", "25%", "--batch", "4", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert together["predictions"][0]["ttft_seconds"] < alone["predictions"][0]["ttft_seconds"]
    assert main([*args, "--concentration", "0"]) == 2
    assert "--concentration 0.0: must be > 0" in capsys.readouterr().err
    assert main([*args, "--budget", "25%", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "tok/s warm" in out
    assert "fewer than 2 experts" in out
    assert main(["plan", "--list-hardware"]) == 0
    assert "h100-pcie-nvme" in capsys.readouterr().out
    assert main(["plan", "--config", str(SWITCH_BASE_8)]) == 2
    assert "needs --config CONFIG.json and --hardware PROFILE" in capsys.readouterr().err


def test_measure_writes_a_profile_the_planner_reads(tmp_path: Path) -> None:
    measured = measure_profile(MeasureOptions.quick(tmp_path), name="here")
    assert measured.disk_read_gb_s > 0
    assert measured.cpu["int4"].gemv_gb_s > 0
    assert measured.overhead.block16_us is not None
    assert measured.overhead.load_window_us is not None
    assert measured.overhead.load_window_us <= measured.overhead.load_us
    assert measured.source.startswith("measured by cpm2 plan --measure")
    assert not list(tmp_path.glob("cpm2-plan-*"))  # the scratch file is gone
    path = tmp_path / "here.json"
    measured.save(path)
    again = load_profile(path)
    assert dataclasses.asdict(again) == dataclasses.asdict(measured)


@pytest.mark.gpu
def test_measure_profiles_the_gpu(tmp_path: Path) -> None:
    import torch

    from engine.planner.measure import gpu_profile

    gpu = gpu_profile(MeasureOptions.quick(tmp_path), torch.device("cuda"))
    assert gpu.h2d_gb_s > 0
    assert gpu.memory_bytes > 0
    assert gpu.matmul["bfloat16"].gemv_gb_s > 0


@pytest.mark.parametrize("name", ["switch", "nllb-moe"])
def test_the_planner_on_the_offload_bench_models(name: str) -> None:
    """The shapes `bench.offload` and `bench.plan_validation` run, through the HF converter as the
    benchmarks build them: every case predicts, int4 included."""
    transformers = pytest.importorskip("transformers")
    from bench.offload_common import NLLB_MOE_CONFIG, SWITCH_CONFIG
    from engine.weights.hf import hf_to_config

    if name == "switch":
        hf = transformers.SwitchTransformersConfig(**SWITCH_CONFIG).to_dict()
    else:
        hf = transformers.NllbMoeConfig(**NLLB_MOE_CONFIG).to_dict()
    config = hf_to_config(hf, has_lm_head=False, source=name)
    profile = load_profile("xeon-2vcpu-24g")
    for experts in ("bfloat16", "int4"):
        for batch in (1, 16):
            p = predict(config, profile, PlanCase(batch=batch, budget="25%", experts=experts, warmup=4, steps=16))
            assert not p.problems
            assert p.warm.tokens_per_second > 0
            assert 0 <= p.warm.hit_rate <= 1
