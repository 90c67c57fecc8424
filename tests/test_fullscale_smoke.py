"""`python -m bench.fullscale` end to end on a tiny NLLB-MoE-shaped config: it builds the model with
`cpm2 init`, measures what it promises, removes the model unless kept, reuses a kept one, and
refuses a kept model of another format.

No timing is checked here (STYLE.md §14): only that the code runs and the report has its keys.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from bench.fullscale import CONFIG, FullscaleConfig, print_report, run
from engine.errors import ConfigError
from engine.weights.loader import inspect_config

TINY_NLLB_MOE = {
    "model_type": "nllb-moe",
    "vocab_size": 1200,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_sparse_step": 2,
    "decoder_sparse_step": 2,
    "num_experts": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_NLLB_MOE))
    return path


def _cfg(config: Path, model_dir: Path, **changes: object) -> FullscaleConfig:
    settings: dict[str, object] = {
        "config": config,
        "dir": model_dir,
        "budget": "25%",
        "group_size": 32,
        "batches": (1, 2),
        "steps": 2,
        "warmup": 1,
        "repeats": 1,
        "source_len": 4,
        "hardware": "xeon-2vcpu-24g",  # the prediction's accuracy is bench.plan_validation's business
        "log": lambda _: None,
        **changes,
    }
    return FullscaleConfig(**settings)  # type: ignore[arg-type]


def test_fullscale_reports_runs_bounds_and_memory(tiny_config: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    report = run(_cfg(tiny_config, model_dir))
    assert not model_dir.exists()  # removed: --keep was not given
    assert report["init_seconds"] > 0
    assert [(r["batch"], r["phase"]) for r in report["runs"]] == [(1, "cold"), (1, "warm"), (2, "cold"), (2, "warm")]
    for r in report["runs"]:
        assert r["tokens"] == r["batch"] * 2
        assert r["bound_tokens_per_second"] == min(
            r["compute_only_tokens_per_second"], r["read_bound_tokens_per_second"]
        )
        assert r["ratio_to_bound"] == pytest.approx(r["tokens_per_second"] / r["bound_tokens_per_second"])
        # The read bound is at the fastest rate the run saw: the store's readings, the samples
        # between its steps or its own reads.
        own = r["experts"]["bytes_moved"] / r["experts"]["transfer_seconds"] / 1e9
        assert r["disk_read_gb_s"] == {
            "decode": pytest.approx(own),
            "prefill": pytest.approx(
                r["encode_experts"]["bytes_moved"] / r["encode_experts"]["transfer_seconds"] / 1e9
            ),
            "sampled": r["sampled_read_gb_s"],
        }
        assert r["read_bandwidth_gb_s"] == max(*r["read_bandwidth_all_gb_s"], r["sampled_read_gb_s"], own)
        assert r["read_bound_tokens_per_second"] == pytest.approx(
            1e9 * r["read_bandwidth_gb_s"] / r["storage_bytes_per_token"]
        )
        assert r["experts"]["misses"] > 0  # a quarter of the experts: decoding loads some
        assert r["predicted_tokens_per_second"] > 0  # the planner's prediction of the same case
    assert (
        report["rss_allowed_bytes"] == report["dense_resident_bytes"] + report["budget_bytes"] + report["slack_bytes"]
    )
    assert report["slack_bytes"] == 1.5 * 2**30
    assert report["rss_after_load_bytes"] <= report["peak_rss_decoding_bytes"]
    assert report["store_bytes"] > 4 * report["budget_bytes"] * 0.9
    out = io.StringIO()
    print_report(report, Console(file=out, width=160))
    assert "of bound" in out.getvalue()


def test_the_disk_is_sampled_after_the_encoder_pass_and_every_timed_step(tiny_config: Path, tmp_path: Path) -> None:
    """`DiskSampler` reads a few other experts each time, outside the timed region; its rate is the
    bytes of all its samples over their seconds."""
    from bench.fullscale import ensure_model
    from bench.offload_common import DiskSampler, decode_cpm2, load_cpm2, storage_read_bytes
    from engine.experts.store import ExpertStore

    model_dir = tmp_path / "model"
    ensure_model(_cfg(tiny_config, model_dir))
    loaded = load_cpm2(model_dir, budget="25%", direct_io=True)
    try:
        store = ExpertStore.open(model_dir, loaded.model.config)
        sampler = DiskSampler(store, count=3)
        before = storage_read_bytes()
        run = decode_cpm2(loaded, batch=2, steps=3, warmup=0, source_len=4, sampler=sampler)
        read = storage_read_bytes() - before
    finally:
        loaded.close()
    assert sampler.samples == 3 + 1
    assert sampler.bytes_read == 4 * 3 * store.layout.nbytes
    # The samples came from storage, beyond what the encoder pass and the timed steps read.
    assert read - run.encode_storage_bytes_read - run.storage_bytes_read >= sampler.bytes_read
    assert run.sampled_read_gb_s == sampler.gb_s == pytest.approx(sampler.bytes_read / sampler.seconds / 1e9)
    assert run.to_dict()["sampled_read_gb_s"] == run.sampled_read_gb_s
    assert DiskSampler(store).gb_s is None  # nothing sampled yet


def test_a_kept_model_is_reused_and_another_format_refused(tiny_config: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    run(_cfg(tiny_config, model_dir, keep=True, batches=(1,)))
    assert (model_dir / "config.json").exists()
    again = run(_cfg(tiny_config, model_dir, keep=True, batches=(1,)))
    assert again["init_seconds"] == 0.0
    with pytest.raises(ConfigError, match="another model"):
        run(_cfg(tiny_config, model_dir, keep=True, group_size=64))
    assert (model_dir / "config.json").exists()  # a refused run leaves a kept model alone


def test_the_default_shape_is_nllb_moe_54b() -> None:
    summary = inspect_config(CONFIG)
    assert summary.config.d_model == 2048
    assert summary.config.moe is not None
    assert summary.config.moe.num_experts == 128
    assert summary.config.moe.top_k == 2


def test_plan_validation_compares_a_run_with_its_prediction(tiny_config: Path, tmp_path: Path) -> None:
    """`bench.plan_validation` on a tiny model: a measured row and the planner's row for the same case."""
    from bench.fullscale import ensure_model
    from bench.plan_validation import ValidationConfig, measure_model, predict_measured, predict_row
    from engine.planner.measure import MeasureOptions
    from engine.planner.predict import PlanCase
    from engine.planner.profile import HardwareProfile, load_profile
    from engine.weights.loader import inspect_checkpoint

    model_dir = tmp_path / "model"
    ensure_model(_cfg(tiny_config, model_dir))
    profile = load_profile("xeon-2vcpu-24g")
    cfg = ValidationConfig(batches=(1, 2), steps=2, warmup=1, repeats=1, log=lambda _: None)
    rows = measure_model("tiny", model_dir, cfg, profile, MeasureOptions.quick(tmp_path))
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        # predicted from the CPU rates measured again just before the row's runs
        assert r["profile"]["cpu"]["bfloat16"] != dataclasses.asdict(profile.cpu["bfloat16"])
        assert r["profile"]["read_contention"] == profile.read_contention
        # the store's read rate read before the repeat and after it, and sampled between the run's
        # steps: the rate it is predicted at
        assert len(r["store_read_gb_s_all"]) == cfg.repeats + 1
        assert r["store_read_gb_s"] == r["sampled_read_gb_s"] > 0
        assert "routing_concentration" in r
        assert r["tokens_per_second_error"] == pytest.approx(
            r["predicted_tokens_per_second"] / r["tokens_per_second"] - 1
        )
        assert 0 <= r["predicted_hit_rate"] <= 1
        # The run's routing call by call (the encoder pass's call, then one per decode step, warm-up
        # and timed, of every decoder MoE layer), and the prediction that replays it beside.
        decoder = [calls for layer, calls in r["routing_trace"].items() if layer.startswith("decoder.")]
        assert decoder
        assert all(len(calls) == cfg.warmup + cfg.steps for calls in decoder)
        top_k = inspect_checkpoint(model_dir).config.moe.top_k  # type: ignore[union-attr]
        assert all(sum(n for _, n in call) == r["batch"] * top_k for calls in decoder for call in calls)
        assert "tokens_per_second_error" in r["replayed"]
        # Predicted at the rates the run's own reads ran at (the provider's link time) in each
        # phase, the store's sampled rate where a phase read nothing; and again at the sampled rate.
        disk = r["disk_read_gb_s"]
        for phase, stats in (("decode", r["experts"]), ("prefill", r["encode_experts"])):
            link = stats["bytes_moved"] / stats["transfer_seconds"] / 1e9 if stats["transfer_seconds"] else None
            assert disk[phase] == pytest.approx(link or r["store_read_gb_s"])
        assert disk["sampled"] == r["store_read_gb_s"]
        assert set(r["at_sampled_rate"]) == {"tokens_per_second_error", "encode_seconds_error"}
    # Each phase's figure is the one at its own rate: predicted with the store "sampled" at the
    # decode rate, the tok/s error is the row's; at the prefill rate, the prefill error is.
    row = next(r for r in rows if r["disk_read_gb_s"]["decode"] != r["disk_read_gb_s"]["prefill"])
    row_profile = HardwareProfile.from_dict(row["profile"], source="the row's")
    config = inspect_checkpoint(model_dir).config
    case = PlanCase(batch=row["batch"], budget=cfg.budget, warmup=cfg.warmup, steps=cfg.steps)
    for phase, key in (("decode", "tokens_per_second_error"), ("prefill", "encode_seconds_error")):
        again = predict_measured(config, row_profile, case, row, disk_read_gb_s=row["disk_read_gb_s"][phase])
        assert again["at_sampled_rate"][key] == pytest.approx(row[key])
    # A run that read nothing is predicted at the sampled rate in both phases.
    unread = {**row, "experts": {**row["experts"], "transfer_seconds": 0.0}, "encode_experts": {}}
    again = predict_measured(config, row_profile, case, unread, disk_read_gb_s=1.25)
    assert again["disk_read_gb_s"] == {"decode": 1.25, "prefill": 1.25, "sampled": 1.25}
    assert again["tokens_per_second_error"] == again["at_sampled_rate"]["tokens_per_second_error"]
    # The row's own rates are what it is predicted from: halving them slows the prediction.
    row = rows[0]
    halved = {
        f: {k: x / 2 if k.endswith("_gb_s") else x for k, x in v.items()} for f, v in row["profile"]["cpu"].items()
    }
    slower = {**row["profile"], "cpu": halved}
    config = inspect_checkpoint(model_dir).config
    again = predict_row(config, profile, {**row, "profile": slower}, cfg)
    assert again["predicted_tokens_per_second"] < row["predicted_tokens_per_second"]
