"""Knowledge inheritance: the KI loss against a direct reference, α's schedule, and `cpm2 train ki`
end to end (metrics, exact resume through the job, vocabulary growth)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cpm2.cli import main
from engine.config import ModelConfig
from engine.errors import ConfigError, InputError
from engine.tokenizer import builtin_corpus, train_sentencepiece
from engine.weights.init import write_random_model
from engine.weights.loader import load_model
from training.config import load_job_config, parse_job_config
from training.distill import STEP_KEY, KILoss, kd_kl, ki_alpha
from training.jobs.ki import KIConfig, train_ki
from training.metrics_log import read_metrics

T = 2.0


def _reference_kd(student_NV: torch.Tensor, teacher_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(p_teacher ‖ p_student) by torch's own kl_div (input: log q_student, target: log p_teacher)."""
    log_q = F.log_softmax(student_NV / temperature, dim=-1)
    log_p = F.log_softmax(teacher_NV / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2


def test_kd_term_matches_torch_kl_div() -> None:
    student = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [-2.0, 1.0, 1.0, 0.0]])
    teacher = torch.tensor([[1.0, 1.5, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 0.5, 0.2]])
    for temperature in (1.0, 2.0, 4.0):
        torch.testing.assert_close(
            kd_kl(student, teacher, temperature=temperature), _reference_kd(student, teacher, temperature)
        )
    assert float(kd_kl(teacher, teacher, temperature=T)) == pytest.approx(0.0, abs=1e-7)


def test_alpha_anneals_linearly_to_zero_at_distill_steps() -> None:
    assert [ki_alpha(t, alpha0=1.0, distill_steps=4) for t in range(7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert ki_alpha(3, alpha0=0.5, distill_steps=10) == pytest.approx(0.35)
    assert ki_alpha(0, alpha0=1.0, distill_steps=0) == 0.0


class _Fixed(nn.Module):
    """A model whose logits are a trainable tensor; records the ids it was called with."""

    def __init__(self, logits_BTV: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits_BTV.clone())
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((input_ids, decoder_input_ids))
        return self.logits * 1.0


def _batch(labels: list[list[int]], step: int) -> dict[str, torch.Tensor]:
    labels_BT = torch.tensor(labels)
    return {
        "input_ids": torch.tensor([[3, 4, 5], [5, 4, 1]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "decoder_input_ids": labels_BT.clamp(min=0),
        "labels": labels_BT,
        STEP_KEY: torch.tensor(step),
    }


def test_ki_loss_is_the_weighted_sum_on_target_positions_only() -> None:
    torch.manual_seed(0)
    student, teacher = _Fixed(torch.randn(2, 3, 6)), _Fixed(torch.randn(2, 3, 6))
    loss_fn = KILoss(teacher, vocab_map=torch.arange(6), temperature=T, alpha0=1.0, distill_steps=4)
    batch = _batch([[1, 4, -100], [5, -100, -100]], step=1)
    loss, metrics = loss_fn(student, batch)
    scored = batch["labels"] != -100
    lm = F.cross_entropy(student.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    kd = _reference_kd(student.logits[scored], teacher.logits[scored], T)
    torch.testing.assert_close(loss, 0.25 * lm + 0.75 * kd)
    assert metrics["alpha"] == 0.75
    torch.testing.assert_close(metrics["kd_loss"], kd.detach())
    loss.backward()
    assert student.logits.grad is not None
    assert teacher.logits.grad is None
    assert not teacher.training
    assert not teacher.logits.requires_grad
    # Padding positions get no gradient, from the LM term or the KL term.
    assert student.logits.grad[~scored].abs().max() == 0


def test_past_distill_steps_the_teacher_is_not_run() -> None:
    student, teacher = _Fixed(torch.randn(2, 3, 6)), _Fixed(torch.randn(2, 3, 6))
    loss_fn = KILoss(teacher, vocab_map=torch.arange(6), temperature=T, alpha0=1.0, distill_steps=4)
    batch = _batch([[1, 4, -100], [5, 2, 3]], step=4)
    loss, metrics = loss_fn(student, batch)
    torch.testing.assert_close(loss, F.cross_entropy(student.logits.flatten(0, 1), batch["labels"].flatten()))
    assert teacher.calls == []
    assert "kd_loss" not in metrics


def test_grown_vocabulary_new_ids_get_no_teacher_signal() -> None:
    # Student ids 0..5; 4 and 5 are new pieces; the teacher (5 ids) holds student 3 at its id 4.
    vocab_map = torch.tensor([0, 1, 2, 4, -1, -1])
    torch.manual_seed(1)
    student, teacher = _Fixed(torch.randn(2, 3, 6)), _Fixed(torch.randn(2, 3, 5))
    loss_fn = KILoss(teacher, vocab_map=vocab_map, temperature=T, alpha0=0.5, distill_steps=10, teacher_unk_id=2)
    batch = _batch([[1, 4, 3], [5, 0, -100]], step=0)
    loss, _ = loss_fn(student, batch)
    # The teacher reads its own ids, unk for the new pieces.
    enc, dec = teacher.calls[0]
    assert enc.tolist() == [[4, 2, 2], [2, 2, 1]]
    assert dec.tolist() == [[1, 2, 4], [2, 0, 0]]
    scored = torch.tensor([[True, False, True], [False, True, False]])  # labels 4, 5 are new; -100 is padding
    kd = _reference_kd(student.logits[scored][:, [0, 1, 2, 3]], teacher.logits[scored][:, [0, 1, 2, 4]], T)
    lm = F.cross_entropy(student.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, 0.5 * lm + 0.5 * kd)


def test_ki_loss_rejects_bad_settings_and_unstamped_batches() -> None:
    teacher = _Fixed(torch.zeros(1, 1, 4))
    with pytest.raises(ConfigError, match="temperature"):
        KILoss(teacher, vocab_map=torch.arange(4), temperature=0.0, distill_steps=1)
    with pytest.raises(ConfigError, match="share no piece"):
        KILoss(teacher, vocab_map=torch.full((4,), -1), distill_steps=1)
    batch = _batch([[1, 2, 3], [1, 2, 3]], step=0)
    del batch[STEP_KEY]
    with pytest.raises(InputError, match="StepStampedBatches"):
        KILoss(teacher, vocab_map=torch.arange(4), distill_steps=1)(_Fixed(torch.zeros(2, 3, 4)), batch)


# ---- the job ----------------------------------------------------------------------------------

TEACHER = ModelConfig(
    vocab_size=1152, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1, num_decoder_layers=1
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ki") / "teacher"
    write_random_model(TEACHER, path, progress=False)
    return path


def _config(out: Path, teacher: Path, **overrides: Any) -> KIConfig:
    data: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "optimizer": {"lr": 3e-3},
        "steps": 4,
        "batch_size": 4,
        "grad_accum": 2,
        "log_every": 1,
        "checkpoint_every": 2,
        "output_dir": str(out),
        "progress": False,
        "span": {"encoder_length": 32, "decoder_length": 16},
        "ki": {
            "teacher": str(teacher),
            "distill_steps": 3,
            # Wider than the teacher and dense; one block per stack keeps the test fast.
            "student_overrides": {"moe": None, "num_encoder_layers": 1, "num_decoder_layers": 1},
        },
    }
    data.update(overrides)
    return parse_job_config(data, KIConfig)


def test_job_logs_ki_metrics_and_resumes_exactly(tmp_path: Path, teacher_dir: Path) -> None:
    full = _config(tmp_path / "full", teacher_dir)
    model_dir = train_ki(full, device="cpu")
    records = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert [r["alpha"] for r in records] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    for r in records[:3]:
        assert r["loss"] == pytest.approx((1 - r["alpha"]) * r["lm_loss"] + r["alpha"] * r["kd_loss"], rel=1e-5)
    assert "kd_loss" not in records[3]
    assert records[3]["loss"] == pytest.approx(records[3]["lm_loss"])
    student, _ = load_model(model_dir, pack=False)
    assert student.config.d_model == 64
    assert student.config.moe is None

    # Stop after step 2 (its checkpoint), then continue to step 4 from it: the same curve, bit for bit.
    train_ki(_config(tmp_path / "resumed", teacher_dir, steps=2), device="cpu", export=False)
    train_ki(_config(tmp_path / "resumed", teacher_dir), device="cpu", export=False)
    resumed = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    keys = ("loss", "lm_loss", "alpha", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    assert [r["kd_loss"] for r in resumed[:3]] == [r["kd_loss"] for r in records[:3]]


def test_cli_grows_the_student_vocabulary(tmp_path: Path, teacher_dir: Path) -> None:
    new_tokenizer = tmp_path / "tokenizer"
    train_sentencepiece(builtin_corpus(), new_tokenizer / "spiece.model", vocab_size=1200)
    config = _config(
        tmp_path / "grown",
        teacher_dir,
        model={"dir": str(teacher_dir)},  # CPM-2's way: the student starts as the teacher, vocabulary grown
        tokenizer=str(new_tokenizer),
        steps=2,
        checkpoint_every=0,
        eval_every=2,
        held_out={"num_batches": 1},
        ki={"teacher": str(teacher_dir), "grow_vocab": True, "distill_steps": 2},
    )
    path = tmp_path / "ki.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["train", "ki", "--config", str(path)]) == 0
    records = read_metrics(tmp_path / "grown" / "metrics.jsonl")
    assert records[0]["alpha"] == 1.0
    assert math.isfinite(records[0]["kd_loss"])
    assert math.isfinite(records[-1]["eval_loss"])
    grown, _ = load_model(tmp_path / "grown" / "model", pack=False)
    assert grown.config.vocab_size == 1408  # 1200 pieces + 100 sentinels, rounded up to 128
    assert (tmp_path / "grown" / "model" / "spiece.model").read_bytes() == (new_tokenizer / "spiece.model").read_bytes()


def test_example_config_is_valid() -> None:
    config = load_job_config(Path(__file__).parents[1] / "training" / "configs" / "ki.yaml", KIConfig)
    assert config.distill_steps() == 130
    assert config.ki.student_overrides["moe"] is None


def test_job_config_errors_say_what_to_change(tmp_path: Path, teacher_dir: Path) -> None:
    with pytest.raises(ConfigError, match="reshape a preset"):
        train_ki(_config(tmp_path / "x", teacher_dir, model={"dir": str(teacher_dir)}), device="cpu", export=False)
    bad = _config(tmp_path / "y", teacher_dir, ki={"teacher": str(teacher_dir), "grow_vocab": True})
    with pytest.raises(ConfigError, match="needs `tokenizer`"):
        train_ki(bad, device="cpu", export=False)
    narrow = {"moe": None, "num_encoder_layers": 1, "num_decoder_layers": 1, "vocab_size": 512}
    small = _config(tmp_path / "z", teacher_dir, ki={"teacher": str(teacher_dir), "student_overrides": narrow})
    with pytest.raises(ConfigError, match=r"only 512 embeddings; set ki\.grow_vocab: true"):
        train_ki(small, device="cpu", export=False)
