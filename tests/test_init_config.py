"""`cpm2 init --config`: a random model of a published shape (here google/switch-base-8's config,
shrunk with `--set`), its experts quantised as they are drawn: byte for byte what `cpm2 quantize`
makes of the float model of the same seed, loadable, and sized on disk as planned; and `--resume`:
an interrupted run finishes into the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.weights.init as init_module
from cpm2.cli import main
from engine.errors import ConfigError
from engine.experts.store import STORE_DIR
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.offload import OffloadConfig, load_for_inference
from engine.weights.init import PROGRESS_FILE, plan_random_model, write_random_model
from engine.weights.loader import inspect_config, load_model
from engine.weights.presets import get_preset
from engine.weights.quantize import QUANTIZATION_KEY, ExpertFormat, quantize_model

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
SWITCH = CONFIGS / "switch-base-8" / "config.json"
# The published config at a size a test can write: two layers per stack, the second one sparse.
SMALL = [
    "d_model=64",
    "d_ff=128",
    "num_heads=2",
    "d_kv=32",
    "num_encoder_layers=2",
    "num_decoder_layers=2",
    "moe.encoder_layers=[1]",
    "moe.decoder_layers=[1]",
    "moe.num_experts=4",
    "vocab_size=1200",
]


def _init(out: Path, *extra: str) -> None:
    argv = ["init", "--config", str(SWITCH), "--out", str(out), "--seed", "3", "--quiet", *extra]
    assert main([*argv, *(a for pair in SMALL for a in ("--set", pair))]) == 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(root.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_int4_experts_are_what_quantize_makes_of_the_float_model(tmp_path: Path) -> None:
    _init(tmp_path / "float")
    quantize_model(tmp_path / "float", tmp_path / "quantized", experts="int4", group_size=32, check_inputs=0)
    _init(tmp_path / "direct", "--experts", "int4", "--group-size", "32")

    store = _files(tmp_path / "direct" / STORE_DIR)
    assert store  # the experts are there, not in the shards
    assert store == _files(tmp_path / "quantized" / STORE_DIR)
    direct, quantized = _tensors(tmp_path / "direct"), _tensors(tmp_path / "quantized")
    assert direct.keys() == quantized.keys()
    assert all(torch.equal(direct[k], quantized[k]) for k in direct)
    records = [
        json.loads((tmp_path / name / "config.json").read_text())["extra"][QUANTIZATION_KEY]
        for name in ("direct", "quantized")
    ]
    assert records[0]["source"] == "cpm2 init"
    assert {k: v for k, v in records[0].items() if k != "source"} == {
        k: v for k, v in records[1].items() if k != "source"
    }


def test_int8_experts_and_dense_load_generate_and_fill_the_planned_bytes(tmp_path: Path) -> None:
    out = tmp_path / "model"
    _init(out, "--experts", "int8", "--dense", "int8")
    record = json.loads((out / "config.json").read_text())["extra"][QUANTIZATION_KEY]
    assert record["experts"] == "int8"
    assert record["dense"] == "int8"

    weights = sum(p.stat().st_size for p in [*out.glob("*.safetensors"), *(out / STORE_DIR).rglob("*")] if p.is_file())
    config = inspect_config(out).config
    plan, _ = plan_random_model(config, dtype="float32", experts=ExpertFormat.choose(config, "int8"))
    assert plan.num_bytes <= weights <= plan.num_bytes * 1.02 + 64 * 1024  # headers and index only

    loaded = load_for_inference(out, offload=OffloadConfig(expert_memory="50%"), progress=False)
    try:
        assert loaded.is_offloaded
        result = Generator(loaded.model).generate([GenerationRequest((5, 6, 7, 1), SamplingParams(max_new_tokens=4))])
        assert len(result[0].token_ids) >= 1
    finally:
        loaded.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "tiny", "--config", str(SWITCH)], "one of --preset NAME or --config"),
        ([], "one of --preset NAME or --config"),
        (["--config", str(SWITCH), "--group-size", "32"], "apply to --experts int4"),
        (["--config", str(SWITCH), "--experts", "int3"], "unknown format"),
        (["--config", str(CONFIGS / "t5-v1_1-xxl" / "config.json"), "--experts", "int8"], "dense model has no experts"),
        (["--config", str(SWITCH), "--dense", "int2"], "--dense int2: unknown format"),
        (["--config", str(SWITCH), "--experts", "int4", "--group-size", "48"], "group"),
    ],
)
def test_bad_requests_are_refused_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["init", "--out", str(out), "--quiet", *argv]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


class _InterruptedError(Exception):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, tensors: int) -> None:
    """Make `write_random_model` fail as a killed run would, after drawing `tensors` tensors."""
    drawn = iter(range(tensors + 1))
    original = init_module.random_tensor

    def random_tensor(*args: object, **kwargs: object) -> torch.Tensor:
        if next(drawn) == tensors:
            raise _InterruptedError
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(init_module, "random_tensor", random_tensor)


@pytest.mark.parametrize("interrupt_after", [3, 40, 10_000], ids=["early", "mid-way", "never"])
def test_an_interrupted_init_resumes_into_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_after: int
) -> None:
    config = get_preset("tiny").config
    options = {"seed": 5, "max_shard_bytes": 64 * 1024, "progress": False}  # many small shards
    write_random_model(config, tmp_path / "whole", **options)  # type: ignore[arg-type]
    interrupted = False
    with monkeypatch.context() as patch:
        _interrupt_after(patch, interrupt_after)
        try:
            write_random_model(config, tmp_path / "resumed", **options)  # type: ignore[arg-type]
        except _InterruptedError:
            interrupted = True
    assert interrupted == (interrupt_after < 100)
    if interrupted:
        # As if a close had been cut short between its renames: a named shard, no index.
        (tmp_path / "resumed" / "model-00001-of-00009.safetensors").write_bytes(b"stale")
        with pytest.raises(ConfigError, match="add --resume"):
            write_random_model(config, tmp_path / "resumed", **options)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="another model, dtype, seed or format"):
            write_random_model(config, tmp_path / "resumed", **{**options, "seed": 6}, resume=True)  # type: ignore[arg-type]
        write_random_model(config, tmp_path / "resumed", **options, resume=True)  # type: ignore[arg-type]
    whole, resumed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _files(tmp_path / "resumed" / STORE_DIR) == _files(tmp_path / "whole" / STORE_DIR)
    assert not (tmp_path / "resumed" / PROGRESS_FILE).exists()
    assert not list((tmp_path / "resumed").rglob("*.tmp"))
    load_model(tmp_path / "resumed")  # a complete, loadable model directory
