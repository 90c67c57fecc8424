"""`cpm2 train …`: the training commands of the `cpm2` CLI.

`cpm2.cli` calls `register`, which adds ``train`` and one sub-subcommand per entry of
`TRAIN_COMMANDS`. A new job (``pretrain``, ``finetune``, …) is a function that adds its parser with
``set_defaults(handler=...)``, appended to `TRAIN_COMMANDS`; handlers return the exit code and raise
`Cpm2Error` for mistakes the user can fix (printed as one line by `cpm2.cli.main`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine.tokenizer import builtin_corpus, load_tokenizer, train_sentencepiece
from training.data.readers import FileReader, ReaderConfig
from training.demo import add_demo_command
from training.jobs.finetune import add_finetune_command
from training.jobs.ki import add_ki_command
from training.jobs.pretrain import add_pretrain_command
from training.jobs.prompt import add_prompt_command
from training.jobs.upcycle import add_upcycle_command
from training.plot import add_plot_command

__all__ = ["TRAIN_COMMANDS", "register"]


def _corpus_lines(corpus: list[str], *, text_field: str) -> Iterator[str]:
    if corpus == ["builtin"]:
        yield from builtin_corpus()
        return
    # SentencePiece trains on sentences: paragraphs and multi-line JSONL texts are split into lines.
    for document in FileReader(ReaderConfig(paths=tuple(corpus), input_field=text_field)):
        yield from document.input.splitlines()


def cmd_tokenizer(args: argparse.Namespace) -> int:
    """Train ``spiece.model`` into ``--out`` and report its size."""
    path = train_sentencepiece(
        _corpus_lines(args.corpus, text_field=args.text_field),
        args.out / "spiece.model",
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        split_digits=args.split_digits,
        user_defined_symbols=tuple(args.symbol),
    )
    tokenizer = load_tokenizer(args.out)
    print(f"wrote {path} ({args.vocab_size} pieces + {tokenizer.num_sentinels} sentinels = {tokenizer.vocab_size})")
    return 0


def add_tokenizer_command(commands: Any) -> None:
    """``cpm2 train tokenizer``."""
    p = commands.add_parser(
        "tokenizer",
        help="train a SentencePiece tokenizer (T5 ids: pad 0, eos 1, unk 2; sentinels appended)",
        description="Train DIR/spiece.model, loadable by every cpm2 command as the model's tokenizer.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write spiece.model into")
    p.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece pieces, sentinels excluded")
    p.add_argument(
        "--corpus",
        nargs="+",
        default=["builtin"],
        metavar="FILE",
        help="'builtin' (the bilingual corpus of `cpm2 init`) or text/JSONL files and globs, .gz allowed",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    p.add_argument("--split-digits", action="store_true", help="one token per digit (helps arithmetic)")
    p.add_argument(
        "--symbol",
        action="append",
        default=[],
        metavar="PIECE",
        help="a piece always kept as one token, never merged (repeatable), e.g. each Chinese numeral",
    )
    p.set_defaults(handler=cmd_tokenizer)


TRAIN_COMMANDS: list[Callable[[Any], None]] = [add_tokenizer_command]
"""Functions adding one ``cpm2 train`` sub-subcommand each; append to add a job."""
TRAIN_COMMANDS.append(add_pretrain_command)
TRAIN_COMMANDS += [add_prompt_command, add_finetune_command]
TRAIN_COMMANDS.append(add_upcycle_command)
TRAIN_COMMANDS.append(add_ki_command)
TRAIN_COMMANDS.append(add_demo_command)


def register(subparsers: Any) -> None:
    """Add ``train`` and its sub-subcommands to the ``cpm2`` parser."""
    train = subparsers.add_parser("train", help="train tokenizers and models (pretraining, adaptation)")
    commands = train.add_subparsers(dest="train_command", required=True, metavar="JOB")
    for add_command in TRAIN_COMMANDS:
        add_command(commands)
    add_plot_command(subparsers)  # `cpm2 plot`: top-level, it reads any run's metrics log
