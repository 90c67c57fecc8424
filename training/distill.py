"""Knowledge inheritance (KI): a student learns from a trained teacher of another size.

Follows Qin et al. 2021, "Knowledge Inheritance for Pre-trained Language Models"
(thunlp/Knowledge-Inheritance), as SEED.md states it:

    L = (1 − α_t)·L_LM + α_t·T²·KL(softmax(z_teacher/T) ‖ softmax(z_student/T)),
    α_t = max(0, α_0·(1 − t / distill_steps)),

with the teacher frozen (eval mode, no gradients) and the KL taken on target positions only
(labels ≠ −100). The T² factor keeps the gradient of the soft term on the scale of the hard one
(Hinton et al. 2015). Their script used T = 2 and stopped distilling at 44% of training.

Teacher and student may differ in every size but the meaning of their token ids: `vocab_map` says,
for each student id, which teacher id is the same piece (−1 for none). A student whose vocabulary
grew (`training.vocab_growth`) reads text the teacher cannot: the teacher sees its unk in place of a
new piece, and new pieces get no teacher signal (they are left out of both distributions, and
positions whose label is a new piece carry no KL).

Legend: B batch rows, T decoder positions, N scored positions, V vocabulary (Vs student, Vt teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError, InputError
from engine.tokenizer import Tokenizer
from training.data.seq2seq import IGNORE_INDEX
from training.trainer import Batch, Metrics

STEP_KEY = "ki_step"
"""Batch entry holding the 0-based optimizer step the micro-batch belongs to (`StepStampedBatches`)."""


def ki_alpha(step: int, *, alpha0: float, distill_steps: int) -> float:
    """α_t = max(0, α_0·(1 − t/distill_steps)): the weight of the teacher term at 0-based step `t`."""
    if distill_steps <= 0:
        return 0.0
    return max(0.0, alpha0 * (1.0 - step / distill_steps))


def kd_kl(student_NV: torch.Tensor, teacher_NV: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), summed over the vocabulary, mean over N rows."""
    log_p_student = F.log_softmax(student_NV.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_NV.float() / temperature, dim=-1)
    kl_N = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl_N.mean() * temperature**2


def vocab_map_between(student: Tokenizer, teacher: Tokenizer) -> torch.Tensor:
    """For each student token id, the teacher id of the same piece string, or −1 (a `KILoss` map).

    Only tokenizer ids are mapped: padding rows beyond the tokenizer (presets round the embedding
    up) stay out of the KL, since no text holds those ids and two models may pad differently."""
    teacher_ids = {teacher.id_to_piece(i): i for i in range(teacher.vocab_size)}
    return torch.tensor([teacher_ids.get(student.id_to_piece(i), -1) for i in range(student.vocab_size)])


class KILoss:
    """The trainer's `LossFn` for knowledge inheritance; holds the frozen teacher.

    Each batch must carry `STEP_KEY` (the step the schedule reads), which `StepStampedBatches` adds;
    the step travels with the data so that a resumed run continues the α schedule exactly.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        vocab_map: torch.Tensor,
        temperature: float = 2.0,
        alpha0: float = 1.0,
        distill_steps: int,
        teacher_unk_id: int = 2,
    ) -> None:
        """`vocab_map[s]` is the teacher id of student id `s`, or −1 for a piece the teacher lacks.

        Raises:
            ConfigError: If the temperature or α_0 is out of range, or the map names no teacher id.
        """
        if temperature <= 0:
            raise ConfigError(f"ki.temperature must be > 0 (the KI paper used 2), got {temperature}")
        if not 0.0 <= alpha0 <= 1.0:
            raise ConfigError(f"ki.alpha0 must be in [0, 1], got {alpha0}")
        shared = (vocab_map >= 0).nonzero().flatten()
        if shared.numel() == 0:
            raise ConfigError("the student and teacher vocabularies share no piece; KI needs the same tokenizer family")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.alpha0 = alpha0
        self.distill_steps = distill_steps
        self.teacher_unk_id = teacher_unk_id
        self.vocab_map = vocab_map.long()
        self.shared_student_ids = shared  # (Vshared,) student ids the KL covers
        self.shared_teacher_ids = self.vocab_map[shared]  # (Vshared,) the same pieces' teacher ids
        self.is_identity = bool((self.vocab_map == torch.arange(len(self.vocab_map))).all())

    def alpha(self, step: int) -> float:
        """α_t of this loss' schedule."""
        return ki_alpha(step, alpha0=self.alpha0, distill_steps=self.distill_steps)

    def _to_teacher_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return ids
        mapped = self.vocab_map.to(ids.device)[ids]
        return mapped.masked_fill(mapped < 0, self.teacher_unk_id)

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's logits (B, T, Vt) on the batch read in its own ids; no gradient."""
        device = batch["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self.teacher(
                self._to_teacher_ids(batch["input_ids"]),
                batch["attention_mask"],
                self._to_teacher_ids(batch["decoder_input_ids"]),
            )

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        if STEP_KEY not in batch:
            raise InputError(f"KI batches need the {STEP_KEY!r} entry; wrap the data in StepStampedBatches")
        alpha = self.alpha(int(batch[STEP_KEY]))
        student_BTV = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        labels_BT = batch["labels"]
        lm_loss = F.cross_entropy(student_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
        metrics: dict[str, float | torch.Tensor] = {"lm_loss": lm_loss.detach(), "alpha": alpha}
        if alpha == 0.0:
            # Past distill_steps the teacher costs nothing: KI's point is to stop consulting it.
            return lm_loss, metrics
        scored_BT = labels_BT != IGNORE_INDEX
        if not self.is_identity:
            labels_mapped_BT = self.vocab_map.to(labels_BT.device)[labels_BT.clamp(min=0)]
            scored_BT &= labels_mapped_BT >= 0
        teacher_BTV = self.teacher_logits(batch)
        student_ids = self.shared_student_ids.to(labels_BT.device)
        teacher_ids = self.shared_teacher_ids.to(labels_BT.device)
        student_NV = student_BTV[scored_BT].index_select(-1, student_ids)
        teacher_NV = teacher_BTV[scored_BT].index_select(-1, teacher_ids)
        if student_NV.shape[0] == 0:
            kd_loss = student_BTV.sum() * 0.0  # nothing to distil: keep the graph, add nothing
        else:
            kd_loss = kd_kl(student_NV, teacher_NV, temperature=self.temperature)
        metrics["kd_loss"] = kd_loss.detach()
        return (1.0 - alpha) * lm_loss + alpha * kd_loss, metrics
