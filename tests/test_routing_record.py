"""`cpm2 generate --record-routing FILE` records the routing of real inputs; `cpm2 plan --routing FILE`
predicts from it (popularity, reuse and concentration per layer), and refuses records of another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpm2.cli import main
from engine.errors import ConfigError
from engine.planner.predict import PlanCase, predict
from engine.planner.profile import load_profile
from engine.planner.recording import ROUTING_FORMAT, RoutingRecord
from engine.weights.loader import inspect_config

TEXTS = ["hello world, and a few more words", "你好，世界"]
HARDWARE = "xeon-2vcpu-24g"


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routing") / "routing.json"
    argv = ["generate", "--model", tiny_model_dir, "--ignore-eos", "--max-new-tokens", "5", "--record-routing", path]
    assert main([str(a) for a in [*argv, *TEXTS]]) == 0
    return path


def test_generate_records_every_moe_layer(recorded: Path, tiny_model_dir: Path) -> None:
    config = inspect_config(tiny_model_dir).config
    assert config.moe is not None
    data = json.loads(recorded.read_text())
    assert data["format"] == ROUTING_FORMAT
    assert data["requests"] == len(TEXTS)
    assert data["source"] == str(tiny_model_dir)
    layers = [f"encoder.{i}" for i in config.moe.encoder_layers] + [f"decoder.{i}" for i in config.moe.decoder_layers]
    assert sorted(data["popularity"]) == sorted(layers)
    top_k = config.moe.top_k
    for layer in layers:
        counts = data["popularity"][layer]
        assert len(counts) == config.moe.num_experts
        if layer.startswith("decoder"):
            # Every row decodes 5 steps (--ignore-eos), each token sent to top_k experts.
            assert sum(counts) == len(TEXTS) * 5 * top_k
    # Reuse is fitted where a layer was called more than once: the decoder's steps.
    assert sorted(data["reuse"]) == sorted(layer for layer in layers if layer.startswith("decoder"))
    assert all(0 <= r <= 1 for r in data["reuse"].values())
    assert all(layer.startswith("encoder") and a > 0 for layer, a in data["concentration"].items())


def test_plan_predicts_from_the_recording(
    recorded: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", "--config", tiny_model_dir, "--hardware", HARDWARE, "--budget", "50%", "--batch", "2", "--json"]
    code, out, err = _run(capsys, *argv, "--routing", recorded)
    assert code == 0, err
    planned = json.loads(out)["predictions"][0]
    record = RoutingRecord.load(recorded)
    case = PlanCase(batch=2, budget="50%")
    config, profile = inspect_config(tiny_model_dir).config, load_profile(HARDWARE)
    expected = predict(
        config, profile, case, popularity=record.popularity, reuse=record.reuse, concentration=record.concentration
    )
    assert planned == json.loads(json.dumps(expected.to_dict()))
    # --reuse given on the command line overrides the recording's, in every decoder layer.
    code, out, _ = _run(capsys, *argv, "--routing", recorded, "--reuse", "1")
    assert code == 0
    sticky = json.loads(out)["predictions"][0]
    assert config.moe is not None
    reuse_all = {f"decoder.{i}": 1.0 for i in config.moe.decoder_layers}
    overridden = predict(
        config, profile, case, popularity=record.popularity, reuse=reuse_all, concentration=record.concentration
    )
    assert sticky == json.loads(json.dumps(overridden.to_dict()))


def test_record_routing_refusals_write_nothing(
    tiny_model_dir: Path, hf_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate = ["generate", "--max-new-tokens", "2", TEXTS[0]]
    code, _, err = _run(capsys, *generate, "--model", hf_model_dirs["t5-v1.1"], "--record-routing", tmp_path / "r.json")
    assert code == 2
    assert "has no MoE layers, so there is no routing to record" in err
    code, _, err = _run(capsys, *generate, "--model", tiny_model_dir, "--record-routing", tmp_path / "no" / "r.json")
    assert code == 2
    assert "does not exist; create it first" in err
    code, _, err = _run(capsys, *generate, "--model", tiny_model_dir, "--record-routing", tmp_path)
    assert code == 2
    assert "a directory; give a file name" in err
    assert list(tmp_path.iterdir()) == []


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_plan_refuses_routing_files_it_cannot_use(
    recorded: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = json.loads(recorded.read_text())
    cases = {
        "not json": ("not json", "not readable JSON"),
        "format": ({**good, "format": "cpm2-routing/9"}, "this cpm2 reads 'cpm2-routing/1'"),
        "counts": ({**good, "popularity": {"decoder.0": [1, -2, 3, 4]}}, "finite values >= 0"),
        "reuse": ({**good, "reuse": {"decoder.0": "high"}}, "reuse['decoder.0'] must be"),
        "layer": ({**good, "reuse": {"decoder.7": 0.5}}, "reuse names decoder.7, not a MoE layer of this config"),
        "experts": ({**good, "popularity": {"decoder.0": [1.0] * 9}}, "has 9 experts in the file"),
        "shape": ([1, 2, 3], "popularity must be"),
    }
    argv = ["plan", "--config", tiny_model_dir, "--hardware", HARDWARE, "--batch", "1", "--json"]
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(data) if isinstance(data, str) else _write(path, data)
        code, _, err = _run(capsys, *argv, "--routing", path)
        assert code == 2, name
        assert message in err, (name, err)
    # A bare {"decoder.0": [counts]} file (the format before recordings) still plans.
    bare = _write(tmp_path / "bare.json", {"decoder.0": good["popularity"]["decoder.0"]})
    assert RoutingRecord.load(bare).reuse == {}
    code, _, err = _run(capsys, *argv, "--routing", bare)
    assert code == 0, err


def test_a_record_checks_against_a_config(recorded: Path, tiny_model_dir: Path, hf_model_dirs: dict[str, Path]) -> None:
    record = RoutingRecord.load(recorded)
    record.check(inspect_config(tiny_model_dir).config, path=recorded)
    with pytest.raises(ConfigError, match="no MoE layers to route"):
        record.check(inspect_config(hf_model_dirs["t5-v1.1"]).config, path=recorded)


def test_fit_reads_reuse_and_concentration_from_the_trace() -> None:
    """`RoutingRecord.fit` (what `--record-routing` and `bench.plan_validation` write and use): a decoder
    layer that keeps one expert is fitted reuse 1 and one that cycles 0; two requests whose encoder
    tokens keep to two experts each are fitted a concentration, which the same call read as 32
    one-token requests is not (nothing shared within a request)."""
    uniform = [1.0] * 8
    trace = {
        "decoder.1": [[(3, 1)] for _ in range(20)],
        "decoder.3": [[(i % 8, 1)] for i in range(20)],
        "encoder.1": [[(0, 9), (1, 7), (4, 10), (6, 6)]],
    }
    popularity = dict.fromkeys(trace, uniform)
    record = RoutingRecord.fit(popularity, trace, top_k=1, requests=2)
    assert record.reuse["decoder.1"] > 0.9
    assert record.reuse["decoder.3"] == 0.0
    assert set(record.concentration) == {"encoder.1"}
    assert RoutingRecord.fit(popularity, trace, top_k=1, requests=32).concentration == {}
    assert RoutingRecord.fit(popularity, {}, top_k=1, requests=2) == RoutingRecord(popularity=popularity, requests=2)
