"""The `cpm2` command line, run in process through `cpm2.cli.main` (plus one real subprocess).

Invariants: `generate --json` prints exactly what `Generator` produces (and what the model's own
greedy argmax gives), from text or from `--input-ids` (which need no tokenizer); `info --json`
counts agree with `summarize`; `init` and `convert` write loadable
models (or, on a dry run or an error, nothing); every user error exits 2 with one line on stderr.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cpm2.cli import main
from engine.config import ModelConfig
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.summary import summarize
from engine.tokenizer import load_tokenizer
from engine.weights.files import INDEX_FILE
from engine.weights.loader import load_model
from engine.weights.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["hello world", "你好，世界"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def _expected_ids(model_dir: Path, texts: list[str], **params: int) -> list[list[int]]:
    model, _ = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    requests = [GenerationRequest(tuple(tokenizer.encode(t)), SamplingParams(**params)) for t in texts]
    return [r.token_ids for r in Generator(model, tokenizer).generate(requests)]


# ---- init / info ------------------------------------------------------------------------------------


def test_init_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "init", "--list")
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert "369.4 GiB" in lines[list(PRESETS).index("cpm2-moe-198b")]


def test_init_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "tiny"
    code, out, _ = _run(capsys, "init", "--preset", "tiny", "--out", out_dir, "--quiet")
    assert code == 0
    assert f"wrote {out_dir}" in out
    assert {"config.json", "spiece.model", "model.safetensors"} <= {p.name for p in out_dir.iterdir()}
    expected = summarize(get_preset("tiny").config, torch.float32)

    code, out, _ = _run(capsys, "info", "--model", out_dir)
    assert code == 0
    assert f"{expected.total_parameters:,}" in out
    assert f"{expected.parameters_per_expert:,}" in out

    code, out, _ = _run(capsys, "info", "--model", out_dir, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["format"] == "cpm2"
    assert info["dtype"] == "float32"
    assert info["summary"] == expected.to_dict()
    assert ModelConfig.from_dict(info["config"]).replace(extra={}) == get_preset("tiny").config

    code, out, _ = _run(capsys, "info", "--model", out_dir, "--json", "--dtype", "bf16")
    assert json.loads(out)["summary"]["total_bytes"] == 2 * expected.total_parameters


def test_init_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "wide"
    overrides = ["d_model=96", "num_heads=4", "d_kv=24", "moe.num_experts=2", "moe.decoder_layers=[1]"]
    argv = ["init", "--preset", "tiny", "--out", out_dir, "--quiet", "--seed", "3"]
    code, _, _ = _run(capsys, *argv, *[x for o in overrides for x in ("--set", o)])
    assert code == 0
    config = ModelConfig.load(out_dir / "config.json")
    want = get_preset("tiny").config
    assert want.moe is not None
    want = want.replace(d_model=96, d_kv=24, moe=replace(want.moe, num_experts=2, decoder_layers=(1,)))
    assert config.replace(extra={}) == want
    assert config.extra["init_seed"] == 3
    model, _ = load_model(out_dir)
    assert model.embed.weight.shape == (want.vocab_size, 96)
    assert len(model.moe_layers()) == 3

    code, out, _ = _run(capsys, "info", "--model", out_dir, "--json")
    assert json.loads(out)["summary"] == summarize(want).to_dict()


def test_init_translation_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The M2M-100 / NLLB options: biases and LayerNorm shifts start at zero, as HF and fairseq
    # initialise them, and the random model generates like any other.
    out_dir = tmp_path / "m2m-like"
    overrides = [
        "position_embedding=sinusoidal",
        "norm=layer",
        "has_attention_bias=true",
        "scale_embedding=true",
        "scale_attention_scores=true",
    ]
    argv = ["init", "--preset", "tiny", "--out", out_dir, "--quiet"]
    assert _run(capsys, *argv, *[x for o in overrides for x in ("--set", o)])[0] == 0
    model, _ = load_model(out_dir, pack=False)
    biases = {name: p for name, p in model.named_parameters() if name.endswith(".bias")}
    assert any(".attn." in name for name in biases)
    assert any("norm" in name for name in biases)
    assert all(not p.any() for p in biases.values())
    code, out, _ = _run(capsys, "generate", "--model", out_dir, "--json", "--max-new-tokens", "6", TEXTS[0])
    assert code == 0
    assert _json_lines(out)[0]["token_ids"] == _expected_ids(out_dir, TEXTS[:1], max_new_tokens=6)[0]


def test_init_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "huge"
    code, out, err = _run(capsys, "init", "--dry-run", "--preset", "cpm2-moe-198b", "--out", out_dir)
    assert code == 0
    assert err == ""
    assert "198,327,119,872 parameters" in out
    assert "369.4 GiB in float16" in out
    assert not out_dir.exists()


# ---- generate ---------------------------------------------------------------------------------------


def test_generate_json_matches_generator(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "generate", "--model", tiny_model_dir, "--json", TEXTS[0])
    assert code == 0
    assert err == ""
    [result] = _json_lines(out)
    assert set(result) == {"text", "token_ids"}
    assert result["token_ids"] == _expected_ids(tiny_model_dir, TEXTS[:1])[0]
    tokenizer = load_tokenizer(tiny_model_dir)
    assert result["text"] == tokenizer.decode(result["token_ids"])

    # Independently of the generator: greedy ids are the teacher-forced argmax after the start token,
    # among the ids the tokenizer can print (the model has more embedding rows than it has pieces).
    model, info = load_model(tiny_model_dir)
    ids = result["token_ids"]
    start = info.config.decoder_start_token_id
    encoder_ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        logits = model(encoder_ids, torch.ones_like(encoder_ids), torch.tensor([[start, *ids[:-1]]]))
    assert logits[0, :, : tokenizer.vocab_size].argmax(-1).tolist() == ids


def test_generate_one_line_per_text_and_stdin(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _expected_ids(tiny_model_dir, TEXTS)
    code, out, _ = _run(capsys, "generate", "--model", tiny_model_dir, "--json", *TEXTS)
    assert code == 0
    assert [r["token_ids"] for r in _json_lines(out)] == expected

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(t + "\n" for t in TEXTS)))
    code, out, _ = _run(capsys, "generate", "--model", tiny_model_dir, "--json", "-")
    assert code == 0
    assert [r["token_ids"] for r in _json_lines(out)] == expected

    code, out, _ = _run(capsys, "generate", "--model", tiny_model_dir, *TEXTS)
    assert code == 0
    tokenizer = load_tokenizer(tiny_model_dir)
    assert out.splitlines() == [tokenizer.decode(ids) for ids in expected]


def test_generate_max_new_tokens(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", tiny_model_dir, "--json", "--max-new-tokens", "5", TEXTS[0]]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    [result] = _json_lines(out)
    ids = result["token_ids"]
    assert 1 <= len(ids) <= 5
    assert len(ids) == 5 or ids[-1] == 1  # shorter only by stopping at EOS
    assert ids == _expected_ids(tiny_model_dir, TEXTS[:1], max_new_tokens=20)[0][: len(ids)]

    code, out, _ = _run(capsys, *argv, "--ignore-eos", "--details")
    [result] = _json_lines(out)
    assert len(result["token_ids"]) == 5
    assert result["finish_reason"] == "length"
    assert len(result["logprobs"]) == 5


def test_generate_details_report_expert_memory(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offloaded, `--details` prints the provider's counters and the expert bytes in RAM against the
    budget (pool + mapped store pages in the page cache) on stderr."""
    argv = ["generate", "--model", tiny_model_dir, "--json", "--details", "--max-new-tokens", "3", TEXTS[0]]
    flags = ["--expert-memory", "25%", "--expert-store-dir", tmp_path]
    code, _, err = _run(capsys, *argv, *flags)
    assert code == 0
    report = json.loads(err.strip().splitlines()[-1])
    memory = report["expert_memory"]
    assert report["expert_stats"]["experts_run"] > 0
    assert memory["resident_bytes"] == memory["pool_bytes"] + memory["mapped_resident_bytes"]
    assert 0 < memory["pool_bytes"] <= memory["budget_bytes"]


# ---- generate from token ids ------------------------------------------------------------------------


def _ids_args(rows: list[list[int]]) -> list[str]:
    return [arg for ids in rows for arg in ("--input-ids", ",".join(map(str, ids)))]


@pytest.fixture
def untokenized_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model without its tokenizer file (links to its config and weights)."""
    path = tmp_path / "no-tokenizer"
    path.mkdir()
    for entry in tiny_model_dir.iterdir():
        if entry.name not in ("spiece.model", "tokenizer.model", "vocab.txt"):
            (path / entry.name).symlink_to(entry)
    return path


def test_generate_from_token_ids_equals_generate_from_text(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = [tokenizer.encode(t) for t in TEXTS]  # with the end-of-sequence id, as a text input gets
    code, out, err = _run(capsys, "generate", "--model", tiny_model_dir, "--json", *_ids_args(rows))
    assert (code, err) == (0, "")
    results = _json_lines(out)
    assert [r["token_ids"] for r in results] == _expected_ids(tiny_model_dir, TEXTS)
    assert [r["text"] for r in results] == [tokenizer.decode(r["token_ids"]) for r in results]


def test_generate_from_token_ids_needs_no_tokenizer(
    untokenized_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [[5, 17, 33, 1], [40, 2, 1]]
    model, _ = load_model(untokenized_model_dir)
    requests = [GenerationRequest(tuple(ids), SamplingParams()) for ids in rows]
    expected = [r.token_ids for r in Generator(model).generate(requests)]

    code, out, err = _run(capsys, "generate", "--model", untokenized_model_dir, "--json", *_ids_args(rows))
    assert (code, err) == (0, "")
    assert _json_lines(out) == [{"text": None, "token_ids": ids} for ids in expected]

    code, out, err = _run(capsys, "generate", "--model", untokenized_model_dir, *_ids_args(rows))
    assert (code, err) == (0, "")
    assert out.splitlines() == [",".join(map(str, ids)) for ids in expected]  # as --input-ids takes them

    code, out, err = _run(capsys, "generate", "--model", untokenized_model_dir, "hello")
    _assert_user_error(code, err, "generate", "no tokenizer", "--input-ids")
    assert out == ""


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("5,x,7", ["'5,x,7'", "comma-separated integer"]),
        ("5,,7", ["'5,,7'", "comma-separated integer"]),
        ("", ["comma-separated integer"]),
        ("5,1152", ["'5,1152'", "token id 1152 is outside", "from 0 to 1151"]),
        ("-1", ["token id -1 is outside", "from 0 to 1151"]),
    ],
)
def test_bad_token_ids(spec: str, needles: list[str], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "generate", "--model", tiny_model_dir, "--input-ids", spec)
    _assert_user_error(code, err, "generate", "--input-ids", *needles)
    assert out == ""


def test_generate_needs_texts_or_ids_not_both(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "generate", "--model", tiny_model_dir, "--input-ids", "5,6", "hello")
    _assert_user_error(code, err, "generate", "not both")
    code, _, err = _run(capsys, "generate", "--model", tiny_model_dir)
    _assert_user_error(code, err, "generate", "nothing to generate from", "--input-ids")


# ---- convert ----------------------------------------------------------------------------------------


def test_convert_hf(hf_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = hf_model_dirs["switch-4e-step2"], tmp_path / "native"
    code, out, err = _run(capsys, "convert", "hf", src, dst, "--max-shard-size", "20KiB")
    assert code == 0, err
    assert f"wrote {dst}" in out
    assert (dst / INDEX_FILE).exists()
    assert json.loads((dst / "config.json").read_text())["extra"]["converted_from"] == str(src)
    ids = torch.tensor([[5, 9, 33, 1]])
    decoder_ids = torch.tensor([[0, 7, 8]])
    logits = []
    for model_dir in (src, dst):
        model, _ = load_model(model_dir)
        with torch.no_grad():
            logits.append(model(ids, torch.ones_like(ids), decoder_ids))
    assert torch.equal(logits[0], logits[1])

    code, _, err = _run(capsys, "convert", "hf", src, dst)
    assert code == 2
    assert "not empty" in err


# ---- errors -----------------------------------------------------------------------------------------


def _assert_user_error(code: int, err: str, command: str, *needles: str) -> None:
    assert code == 2
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith(f"cpm2 {command}: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    code, out, err = _run(capsys, "info", "--model", missing)
    _assert_user_error(code, err, "info", str(missing), "no such model directory")
    assert out == ""
    code, out, err = _run(capsys, "generate", "--model", missing, "hi")
    _assert_user_error(code, err, "generate", str(missing))
    assert out == ""


def test_unknown_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "init", "--preset", "gpt-5", "--out", tmp_path / "x")
    _assert_user_error(code, err, "init", "unknown preset 'gpt-5'", "cpm2-moe-198b")
    assert not (tmp_path / "x").exists()
    code, _, err = _run(capsys, "init", "--out", tmp_path / "x")
    _assert_user_error(code, err, "init", "--preset")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("d_model", "--set takes FIELD=VALUE"),
        ("num_layerz=3", "num_layerz"),
        ("d_model=-5", "d_model must be a positive integer"),
        ("d_model.x=1", "'d_model' is not a config section"),
        ("moe.num_experts=0", "moe.num_experts"),
    ],
)
def test_bad_set(override: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "init", "--preset", "tiny", "--out", tmp_path / "x", "--set", override)
    _assert_user_error(code, err, "init", needle)
    assert not (tmp_path / "x").exists()


def test_bad_size(tmp_path: Path, hf_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "x"
    code, _, err = _run(capsys, "init", "--preset", "tiny", "--out", out_dir, "--max-shard-size", "12parsecs")
    _assert_user_error(code, err, "init", "--max-shard-size", "'12parsecs'")
    assert not out_dir.exists()
    code, _, err = _run(capsys, "convert", "hf", hf_model_dirs["mt5"], out_dir, "--max-shard-size", "0")
    _assert_user_error(code, err, "convert", "--max-shard-size", "positive")
    assert not out_dir.exists()


def test_unknown_source_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "convert", "megatron", tmp_path, tmp_path / "x")
    _assert_user_error(code, err, "convert", "'megatron'")


# ---- the installed entry points ---------------------------------------------------------------------


def test_python_dash_m_entry_point(tiny_model_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cpm2", "info", "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{summarize(get_preset('tiny').config).total_parameters:,}" in done.stdout

    done = subprocess.run(
        [sys.executable, "-m", "cpm2", "info", "--model", str(tiny_model_dir / "nowhere")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("cpm2 info: error: ")
    assert "Traceback" not in done.stderr


# ---- soft prompts ----------------------------------------------------------------------------------


def test_prompt_from_text_equals_the_written_out_input(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prompt made of "Q:" | input | " means " | pair reads exactly as that text would."""
    prompt_file = tmp_path / "p.safetensors"
    code, out, _ = _run(
        capsys, "prompt", "--model", tiny_model_dir, "--out", prompt_file, "--prefix", "Q:", "--infix", " means "
    )
    assert code == 0
    assert "prefix [" in out
    assert "infix [" in out
    flags = ["--json", "--max-new-tokens", "6", "--ignore-eos"]
    code, out, _ = _run(
        capsys, "generate", "--model", tiny_model_dir, "--prompt", prompt_file, "--text-pair", "四千", *flags, "x"
    )
    assert code == 0
    with_prompt = _json_lines(out)[0]["token_ids"]
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = [tokenizer.encode(t, add_eos=False) for t in ("Q:", "x", " means ")] + [tokenizer.encode("四千")]
    model, _ = load_model(tiny_model_dir)
    request = GenerationRequest(
        tuple(i for part in ids for i in part), SamplingParams(max_new_tokens=6, ignore_eos=True)
    )
    assert with_prompt == Generator(model, tokenizer).generate([request])[0].token_ids


def test_prompt_errors(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "prompt", "--model", tiny_model_dir, "--out", tmp_path / "p.safetensors")
    _assert_user_error(code, err, "prompt", "at least one of prefix")
    assert not (tmp_path / "p.safetensors").exists()
    code, _, err = _run(capsys, "generate", "--model", tiny_model_dir, "--prompt", tmp_path / "none.safetensors", "x")
    _assert_user_error(code, err, "generate", "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04 not a prompt")
    code, _, err = _run(capsys, "generate", "--model", tiny_model_dir, "--prompt", tmp_path / "bad.safetensors", "x")
    _assert_user_error(code, err, "generate", "pickle")


def test_commands_of_a_missing_extra_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The serving image installs only the `server` extra: `cpm2 serve` must still start, and
    # `cpm2 train` must say what is missing instead of the whole CLI failing to import.
    import importlib

    import cpm2.cli

    real_import = importlib.import_module

    def without_matplotlib(name: str, package: str | None = None) -> object:
        if name == "training.cli":
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
        return real_import(name, package)

    monkeypatch.setattr(cpm2.cli.importlib, "import_module", without_matplotlib)
    assert cpm2.cli.main(["train", "pretrain", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'cpm2[training]'" in err
    assert "'matplotlib'" in err
    assert cpm2.cli.main(["plot", "runs/x/metrics.jsonl"]) == 2
    assert "cpm2[training]" in capsys.readouterr().err
    assert "serve" in cpm2.cli.build_parser().format_help()
