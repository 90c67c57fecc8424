"""Loss functions with the trainer's `(model, batch) -> (loss, metrics)` shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.trainer import Batch, Metrics

IGNORE_INDEX = -100


def seq2seq_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """Token-mean cross-entropy of the teacher-forced decoder over labels != -100, plus accuracy.

    Computed in float32 even under bf16 autocast: the log-softmax over a large vocabulary is where
    bf16 loses the most precision.
    """
    logits_BTV = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    labels_BT = batch["labels"]
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        scored = labels_BT != IGNORE_INDEX
        correct = (logits_BTV.argmax(-1) == labels_BT) & scored
        accuracy = correct.sum() / scored.sum().clamp(min=1)
    return loss, {"accuracy": accuracy}
