"""The built-in tasks written out in words: how multi-task pretraining shows them, and what a soft
prompt for them starts from.

T5 (Raffel et al. 2020, §3.5.2) and PPT (Gu et al. 2022, "Pre-trained Prompt Tuning", by CPM-2's
authors) mix supervised tasks into pretraining, each example wrapped in text that names the task.
A prompt tuned later on the bare input then only has to recall a skill the frozen model has, which
is what makes prompt tuning work on a small model (Lester et al. 2021 found it needs scale otherwise).

An instruction has up to three pieces of text placed exactly where a soft prompt's prefix, infix and
suffix go (`engine.prompts.assemble_encoder_embeds`): ``prefix input infix text_pair suffix``. So a
prompt initialised from an instruction's token embeddings starts as the instruction itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError
from training.data.example import Example

__all__ = ["INSTRUCTIONS", "Instruction", "instruction_for", "with_instruction"]


@dataclass(frozen=True)
class Instruction:
    """Text around a task's input: ``prefix input infix text_pair suffix`` (pieces may be empty)."""

    prefix: str = ""
    infix: str = ""
    suffix: str = ""

    def parts(self) -> dict[str, str]:
        """The non-empty pieces by soft-prompt part name (``prefix`` / ``infix`` / ``suffix``)."""
        return {name: text for name, text in vars(self).items() if text}


INSTRUCTIONS: dict[str, Instruction] = {
    "num2zh": Instruction(prefix="把数字写成中文："),
    "zh2num": Instruction(prefix="把中文写成数字："),
    "add": Instruction(prefix="计算：", suffix=" 等于几？"),
    "same": Instruction(prefix="判断：", infix=" 和 ", suffix=" 是同一个数吗？"),
}


def instruction_for(task: str) -> Instruction:
    """The instruction of built-in `task` (ConfigError names the known ones)."""
    try:
        return INSTRUCTIONS[task]
    except KeyError:
        raise ConfigError(f"no instruction for task {task!r}; built-in tasks are {sorted(INSTRUCTIONS)}") from None


def with_instruction(example: Example) -> Example:
    """`example` as one instructed input: its task's text around the input (and text pair)."""
    if not example.task:
        raise ConfigError("an example needs its task name to get an instruction")
    words = instruction_for(example.task)
    text = words.prefix + example.input
    if example.text_pair is not None:
        text += words.infix + example.text_pair
    return Example(input=text + words.suffix, target=example.target, task=example.task)
