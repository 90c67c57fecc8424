"""Published configs build at their published sizes, through the code path `cpm2 info` uses.

Each `tests/fixtures/configs/<name>/config.json` is a released model's config (sources in that
folder's README). `describe_model` reads it without weights and counts parameters on the meta device;
the count must match the figure the model's authors published, within 1 % or, when the figure is
given more roughly, within the rounding of its last digit ("11B" covers 10.5B to 11.5B: a count of
11.14B cannot be told from 11B by it). Where no figure is published (Switch-Base with 8 to 256
experts), HF transformers' own model, built on the meta device from the same file, is the reference.
Also: `cpm2 info` on a config-only directory and on a config.json path, in text and JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from cpm2.cli import main
from engine.model_info import ModelInfo, describe_model
from engine.offload import OffloadConfig
from engine.summary import expert_bytes_by_format, summarize
from engine.weights.loader import inspect_config

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
SWITCH_PAPER = "Switch Transformers (Fedus et al., arXiv 2101.03961) Table 9"


@dataclass(frozen=True)
class Published:
    """A parameter count as published: the value, its text, its source and its precision."""

    value: float
    text: str
    source: str
    rounding: float
    """Half a unit of the last digit published ("7B": 0.5e9)."""
    mismatch: str | None = None
    """Why the published config.json cannot reproduce the figure (the test is then a strict xfail)."""

    def tolerance(self) -> float:
        return max(0.01 * self.value, self.rounding)


PUBLISHED: dict[str, Published] = {
    # The paper's Switch-Base is GEGLU with d_ff 2048; the released one is ReLU with d_ff 3072. Both
    # make 4,718,592 parameters per expert and per dense FFN, so the count is the same model size.
    "switch-base-128": Published(7e9, "7B", f"{SWITCH_PAPER}, Switch-Base (128 experts)", 0.5e9),
    "switch-large-128": Published(26e9, "26B", f"{SWITCH_PAPER}, Switch-Large (128 experts)", 0.5e9),
    "switch-xxl-128": Published(
        395e9,
        "395B",
        f"{SWITCH_PAPER}, Switch-XXL",
        0.5e9,
        mismatch="the published config.json has num_layers 48, num_decoder_layers 12 and a non-gated gelu FFN; "
        "the paper's Switch-XXL has 24 layers of gated GEGLU experts",
    ),
    # The model card rounds this to 1.6T; the paper gives 1571B.
    "switch-c-2048": Published(
        1571e9,
        "1571B",
        f"{SWITCH_PAPER}, Switch-C (model card: 1.6T)",
        0.5e9,
        mismatch="the published config.json has num_decoder_layers 12 and decoder_sparse_step 0, a dense "
        "12-block decoder; the paper's Switch-C has 15 + 15 blocks, every one MoE",
    ),
    "t5-v1_1-xxl": Published(11e9, "11B", f"{SWITCH_PAPER}, T5-XXL (t5x docs: T5 1.1 'xxl' replaces '11B')", 0.5e9),
    "flan-t5-xxl": Published(11e9, "11B", "Scaling Instruction-Finetuned LMs (Chung et al., arXiv 2210.11416)", 0.5e9),
    "mt5-xxl": Published(13e9, "13B", "mT5 (Xue et al., arXiv 2010.11934), mT5-XXL", 0.5e9),
    "cpm2-11b": Published(11e9, "11B", "CPM-2 (Zhang et al., arXiv 2106.10715), CPM-2", 0.5e9),
    "cpm2-moe-198b": Published(198e9, "198B", "CPM-2 (Zhang et al., arXiv 2106.10715), CPM-2-MoE", 0.5e9),
    # The model's name is its published size; 615,073,792 with the tied head counted once.
    "nllb-200-distilled-600M": Published(
        600e6, "600M", "No Language Left Behind (NLLB Team, arXiv 2207.04672), NLLB-200-Distilled", 0.05e9
    ),
}
#: Switch-Base checkpoints whose size nobody published: HF transformers is the reference.
UNPUBLISHED = ["switch-base-8", "switch-base-16", "switch-base-32", "switch-base-64", "switch-base-256"]
#: CPM-2-MoE: "125.8M parameters per expert" (the paper; SEED.md).
CPM2_MOE_PER_EXPERT = 125.8e6


def _describe(name: str) -> ModelInfo:
    offload = OffloadConfig(expert_memory="100%")
    return describe_model(CONFIGS / name, dtype="bf16", device="cpu", offload=offload)


def test_every_fixture_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) == sorted([*PUBLISHED, *UNPUBLISHED])
    assert all((CONFIGS / name / "config.json").is_file() for name in [*PUBLISHED, *UNPUBLISHED])


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=p.mismatch)) if p.mismatch else name
        for name, p in PUBLISHED.items()
    ],
)
def test_parameter_count_matches_the_published_figure(name: str) -> None:
    published = PUBLISHED[name]
    described = _describe(name)
    count = described.summary.total_parameters
    diff = count - published.value
    assert abs(diff) <= published.tolerance(), (
        f"{name}: {count:,} parameters vs {published.text} published ({published.source}): "
        f"{100 * diff / published.value:+.2f} %"
    )


def test_cpm2_moe_expert_matches_the_paper() -> None:
    summary = _describe("cpm2-moe-198b").summary
    assert abs(summary.parameters_per_expert - CPM2_MOE_PER_EXPERT) <= 0.05e6  # "125.8M": one decimal
    assert (summary.num_moe_layers, summary.num_experts_per_layer) == (48, 32)
    # "240 MiB in fp16" per expert (SEED.md): the bfloat16 row of the format table is the same size.
    assert round(expert_bytes_by_format(summary)["bfloat16"] / 2**20) == 240


def test_switch_c_builds_at_the_paper_size_with_the_paper_decoder() -> None:
    """The switch-c-2048 mismatch is its config.json, not the count: with the paper's decoder (15
    MoE blocks, like the encoder) the same code gives the paper's 1,571B."""
    config = inspect_config(CONFIGS / "switch-c-2048").config
    assert config.moe is not None
    paper = config.replace(num_decoder_layers=15, moe=replace(config.moe, decoder_layers=tuple(range(15))))

    # The count is linear in the expert count, so two small builds give the 2048-expert one exactly
    # (a meta build of 61,440 experts would take most of a minute).
    def count(num_experts: int) -> int:
        assert paper.moe is not None
        return summarize(paper.replace(moe=replace(paper.moe, num_experts=num_experts))).total_parameters

    two, three = count(2), count(3)
    total = two + (2048 - 2) * (three - two)
    assert abs(total - 1571e9) <= 0.01 * 1571e9, f"{total:,}"


@pytest.mark.parametrize("name", [*UNPUBLISHED, "switch-base-128", "switch-large-128", "nllb-200-distilled-600M"])
def test_parameter_count_matches_transformers(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    data = json.loads((CONFIGS / name / "config.json").read_text())
    with torch.device("meta"):
        reference = transformers.AutoModelForSeq2SeqLM.from_config(transformers.AutoConfig.for_model(**data))
    expected = sum(p.numel() for p in reference.parameters())  # the tied head counted once, as here
    assert _describe(name).summary.total_parameters == expected


# ---- cpm2 info without weights ----------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("target", ["dir", "file"])
def test_info_on_a_config_alone(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A directory holding nothing but config.json (as before a download), or the config.json itself.
    model_dir = tmp_path / "switch-base-8"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes((CONFIGS / "switch-base-8" / "config.json").read_bytes())
    path = model_dir if target == "dir" else model_dir / "config.json"
    argv = ["info", "--model", path, "--dtype", "bf16", "--expert-memory", "25%"]

    code, out, err = _run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    info = json.loads(out)
    assert {"path", "format", "dtype", "config", "summary", "cpu_kernels"} <= set(info)
    assert (info["format"], info["has_weights"], info["family"], info["dtype"]) == (
        "hf",
        False,
        "switch_transformers",
        "bfloat16",
    )
    summary = info["summary"]
    assert summary["total_parameters"] == 619_339_008
    assert summary["parameters_per_expert"] == 2 * 768 * 3072
    assert info["expert_bytes_by_format"] == {
        "float32": 4 * 2 * 768 * 3072,
        "bfloat16": 2 * 2 * 768 * 3072,
        "int8": 2 * 768 * 3072 + 4 * (3072 + 768),  # values + a float32 scale per output row
        "int4": 768 * 3072 + 4 * (2 * 768 * 3072 // 64),  # half a byte + a bf16 scale and zero per 64
    }
    plan = info["memory_plan"]
    per_expert = 2 * 2 * 768 * 3072
    budget = int(summary["expert_bytes"] * 0.25)
    assert plan["budget_bytes"] == budget
    assert plan["is_offloaded"] is True
    # No weights: the store is assumed in the config's torch_dtype (float32), so a bfloat16 CPU run
    # needs staging buffers (4 KiB-aligned float32 blobs) out of the same budget.
    blob = 4 * 2 * 768 * 3072
    assert plan["store_dtype"] == "float32"
    assert plan["window"] == 4
    assert plan["num_slots"] == (budget - 4 * blob) // per_expert
    assert plan["min_budget_bytes"] == 2 * per_expert + blob
    assert plan["dense_bytes"] == 2 * summary["dense_parameters"]

    code, out, err = _run(capsys, *argv)
    assert (code, err) == (0, "")
    assert "config only, no weights" in out
    assert "619,339,008" in out
    assert f"{plan['num_slots']} slots" in out
    assert "float32 18.0 MiB, bfloat16 9.0 MiB" in out


def test_info_reports_a_budget_too_small_without_failing(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["info", "--model", CONFIGS / "cpm2-moe-198b", "--dtype", "bf16", "--expert-memory", "300MiB"]
    code, out, err = _run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    plan = json.loads(out)["memory_plan"]
    assert plan["is_too_small"] is True
    assert plan["min_budget_bytes"] == 2 * 2 * 125_829_120 + 3 * 4 * 4096 * 10240  # 2 experts + 1 float32 blob
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert "too small" in out
    assert "--expert-memory 960.0MiB or more" in out


def test_info_for_a_gpu_this_machine_lacks(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(capsys, "info", "--model", CONFIGS / "switch-base-8", "--device", "cuda")
    assert code == 2
    assert err.count("\n") == 1
    assert "no GPU" in err
    assert "--expert-memory SIZE" in err
    # An explicit budget needs no measurement: the plan is made for the GPU.
    code, out, err = _run(
        capsys, "info", "--model", CONFIGS / "switch-base-8", "--device", "cuda", "--expert-memory", "64MiB", "--json"
    )
    assert (code, err) == (0, "")
    plan = json.loads(out)["memory_plan"]
    assert plan["device"] == "cuda"
    assert plan["staging_bytes"] == 0  # a GPU converts after the copy
    assert plan["host_tier"] in ("pinned", "disk")


def test_info_on_a_dense_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "info", "--model", CONFIGS / "t5-v1_1-xxl" / "config.json", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["config"]["tie_word_embeddings"] is False  # the config says the checkpoint has an lm_head
    assert info["expert_bytes_by_format"] == {}
    assert info["memory_plan"]["is_offloaded"] is False
    assert info["memory_plan"]["resident_bytes"] == 4 * info["summary"]["total_parameters"]
