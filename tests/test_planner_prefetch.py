"""`cpm2 plan` replays the provider's guessed loads where the precision of its predictions is given
(`engine.planner.replay`), and `cpm2 generate --record-routing` records that precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpm2.cli import main
from engine.errors import ConfigError
from engine.experts.provider import guesses_that_pay
from engine.planner.predict import PlanCase, Prediction, predict
from engine.planner.recording import RoutingRecord, moe_layer_names, prediction_precision
from engine.weights.loader import inspect_config
from tests.test_planner import SWITCH_BASE_8, _profile

CASE = PlanCase(batch=1, budget="25%")


@pytest.fixture(scope="module")
def switch8():  # type: ignore[no-untyped-def]
    return inspect_config(SWITCH_BASE_8).config


def _at(config, precision: float | None, **profile: object) -> Prediction:  # type: ignore[no-untyped-def]
    shares = dict.fromkeys(moe_layer_names(config), precision) if precision is not None else None
    return predict(config, _profile(**profile), CASE, precision=shares)


def test_the_planner_guesses_by_the_providers_rule() -> None:
    # 2.5 ms of dense work, 1 ms a load: two fit in the gap, the third pays at p 0.6 (0.6 x 0.5 >
    # 0.4 x 0.5) and not at 0.4.
    assert guesses_that_pay(2.5e-3, beta=1e-3, precision=0.6, window=4) == 3
    assert guesses_that_pay(2.5e-3, beta=1e-3, precision=0.4, window=4) == 2
    assert guesses_that_pay(1e-3, beta=0.0, precision=0.1, window=4) == 4  # loads cost nothing yet


def test_right_guesses_turn_batch_1_reads_into_hits(switch8) -> None:  # type: ignore[no-untyped-def]
    """Switch-base-8 at batch 1: a 9 MiB expert reads in ~6 ms, far longer than the dense work
    between MoE layers, so one guess a layer is made only while it is likely right."""
    off = _at(switch8, None)
    # Below the provider's minimum precision nothing is guessed: the same prediction as without.
    assert _at(switch8, 0.25).warm == off.warm
    sure = _at(switch8, 1.0)
    assert sure.warm.hit_rate > off.warm.hit_rate + 0.2
    # Right every time, one guess a layer (top-1) serves every call of the six decoder MoE layers
    # (the first one's guessed from the stack's input), the layers served by guesses staying
    # predicted (as in the provider).
    assert sure.warm.hit_rate == 1.0
    assert sure.warm.stall_seconds < off.warm.stall_seconds
    assert sure.warm.tokens_per_second > off.warm.tokens_per_second
    # Right guesses replace demand loads (bytes about the same); wrong ones add reads of their own,
    # and fewer pay: at 0.6 the one guess a layer would more likely delay the next layer's loads.
    assert sure.warm.bytes_read_per_step <= 1.1 * off.warm.bytes_read_per_step
    assert _at(switch8, 0.7).warm.bytes_read_per_step > sure.warm.bytes_read_per_step
    assert _at(switch8, 0.6).warm == off.warm


def test_dense_work_under_guessed_reads_is_slowed_by_them(switch8) -> None:  # type: ignore[no-untyped-def]
    # Without guesses, reads happen inside MoE layers only: the dense work is the same either way.
    assert _at(switch8, None, read_contention=2.0).warm.dense_seconds == _at(switch8, None).warm.dense_seconds
    calm, contended = _at(switch8, 1.0), _at(switch8, 1.0, read_contention=2.0)
    assert contended.warm.dense_seconds > calm.warm.dense_seconds
    # At most the whole of it twice as long.
    assert contended.warm.dense_seconds <= 2 * calm.warm.dense_seconds


def test_precision_is_read_from_the_providers_counters() -> None:
    layers = {
        "encoder.0": {"predicted": 0, "predicted_used": 0},
        "decoder.1": {"predicted": 8, "predicted_used": 6},
        "decoder.3": {"predicted": 4, "predicted_used": 0},
    }
    assert prediction_precision(layers) == {"decoder.1": 0.75, "decoder.3": 0.0}


def test_a_precision_must_be_a_share(switch8, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"precision of decoder.1: 1.5 is not a share in \[0, 1\]"):
        predict(switch8, _profile(), CASE, precision={"decoder.1": 1.5})
    with pytest.raises(ConfigError, match=r"--routing x.json: the precision of decoder.1 is -0.2"):
        RoutingRecord(popularity={}, precision={"decoder.1": -0.2}).check(switch8, path=Path("x.json"))
    with pytest.raises(ConfigError, match=r"names decoder\.99, not a MoE layer"):
        RoutingRecord(popularity={}, precision={"decoder.99": 0.5}).check(switch8, path=Path("x.json"))
    assert main(["plan", "--config", str(SWITCH_BASE_8), "--hardware", "xeon-2vcpu-24g", "--precision", "1.5"]) == 2
    assert "--precision 1.5: a share in [0, 1]" in capsys.readouterr().err


def test_cli_plans_with_a_precision(tmp_path: Path, switch8, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    profile = tmp_path / "test.json"
    _profile().save(profile)
    argv = ["plan", "--config", str(SWITCH_BASE_8), "--hardware", str(profile), "--budget", "25%", "--batch", "1"]
    assert main([*argv, "--precision", "1", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["predictions"][0]
    assert planned == json.loads(json.dumps(_at(switch8, 1.0).to_dict()))
    # The table's title folds where the config's path is long (a CI checkout): compare words.
    assert main([*argv, "--precision", "0.9"]) == 0
    assert "prefetch at the given precision" in " ".join(capsys.readouterr().out.split())
    assert main(argv) == 0
    assert "no prefetch" in " ".join(capsys.readouterr().out.split())


def test_generate_records_the_precision_of_an_offloaded_run(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "routing.json"
    argv = ["generate", "--model", tiny_model_dir, "--expert-memory", "50%", "--ignore-eos", "--max-new-tokens", "6"]
    assert main([str(a) for a in [*argv, "--record-routing", path, "--details", "hello world", "a second input"]]) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["expert_stats"]
    record = RoutingRecord.load(path)
    # Every layer the provider predicted, at the share of its predictions that were right: the run's
    # overall share is their mean weighted by predictions made.
    overall = stats["predicted_used"] / stats["predicted"]
    assert min(record.precision.values()) <= overall <= max(record.precision.values())
    config = inspect_config(tiny_model_dir).config
    assert config.moe is not None
    assert len(config.moe.decoder_layers) > 1
    assert set(record.precision) >= {f"decoder.{i}" for i in config.moe.decoder_layers}  # the first too
    assert all(0 <= share <= 1 for share in record.precision.values())
    record.check(config, path=path)
    # Resident runs predict nothing: no precision recorded.
    resident = tmp_path / "resident.json"
    assert main([str(a) for a in [*argv[:3], "--record-routing", resident, "hello world"]]) == 0
    assert RoutingRecord.load(resident).precision == {}
