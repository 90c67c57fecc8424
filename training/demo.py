"""`cpm2 train demo` (`make demo-model`): the shipped demo model, made end to end by the jobs users run.

Stages, each an ordinary job whose run directory sits under `work_dir` (rerunning the command resumes
the stage that was interrupted and skips finished ones):

1. tokenizer — SentencePiece on the generated corpus plus the task instructions, digits split and
   each Chinese numeral its own piece, so ``4096`` and ``四千零九十六`` align token for token;
2. pretrain — the dense `demo-dense` preset from scratch: span corruption mixed with the built-in
   tasks written with their instructions (multi-task pretraining, `training.jobs.mixture`);
3. upcycle — every FFN becomes `num_experts` copies with frozen centroids, and training continues on
   the same mixture with CPM-2's balanced routing;
4. prompt — for each task a soft prompt on the frozen MoE model, started from that task's
   instruction words and trained on the bare input, exactly as the server will be sent it;
5. ship — the MoE model (in `ship_dtype`) to `out`, its prompts to `out/prompts/<task>.safetensors`
   (the server serves them read-only beside uploads), held-out exact match of the shipped files to `out/eval.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from engine.model import Seq2SeqLM
from engine.offload import load_for_inference
from engine.prompts import SoftPrompt, parse_soft_prompt
from engine.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from engine.weights.loader import load_model
from training.config import Section, parse_job_config, read_config_file
from training.evaluate import evaluate_tasks
from training.jobs.export import write_model_dir
from training.jobs.pretrain import PretrainConfig, pretrain
from training.jobs.prompt import PromptJobConfig, run_prompt_job
from training.jobs.upcycle import UpcycleConfig, upcycle
from training.tasks import TASKS, generate_task, iter_documents
from training.tasks.instructions import INSTRUCTIONS, with_instruction

__all__ = ["DemoConfig", "build_demo", "evaluate_model_dir", "load_served", "score_tasks"]

#: Chinese numerals and units, each kept a piece of its own (never merged into words).
NUMERAL_PIECES = tuple("零一二三四五六七八九十百千万亿两")
EVAL_FILE = "eval.json"
PRODUCER = "cpm2 train demo"
TIMINGS_FILE = "stage_seconds.json"


class DemoConfig(Section):
    """The demo pipeline: where it writes, the tokenizer, and each stage's job settings."""

    out: Path = Path("models/demo")
    """The shipped model directory (replaced at the end; `make serve` serves it)."""
    work_dir: Path = Path("runs/demo")
    """Run directories of the stages (checkpoints, metrics logs); safe to delete afterwards."""
    tokenizer_pieces: int = Field(1000, ge=300)
    """SentencePiece pieces (sentinels come on top: the preset's vocabulary must hold both)."""
    tokenizer_documents: int = Field(2000, ge=10)
    """Generated documents the tokenizer learns from."""
    pretrain: dict[str, Any]
    """`cpm2 train pretrain` settings (`tokenizer`, `output_dir` are set by the pipeline)."""
    upcycle: dict[str, Any]
    """`cpm2 train upcycle` settings (`model`, `output_dir` are set by the pipeline; the tokenizer is
    the dense model's)."""
    prompt: dict[str, Any]
    """`cpm2 train prompt` settings shared by every task (`model`, `task.name`, `output_dir` set here)."""
    prompt_tasks: dict[str, dict[str, Any]]
    """Task → its prompt settings, merged over `prompt` (e.g. lengths: `same` wants an infix)."""
    num_eval_examples: int = Field(200, ge=1)
    """Held-out `test` examples per task scored at the end."""
    ship_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the shipped weights; answers are scored as a CPU server loads them (float16 files
    are served as bfloat16 there, so halving the bytes in git costs precision)."""

    @model_validator(mode="after")
    def _known_tasks(self) -> DemoConfig:
        unknown = sorted(set(self.prompt_tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"prompt_tasks has unknown task(s) {unknown}; built-in tasks are {sorted(TASKS)}")
        return self


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


class DemoPlan:
    """The stage configs of a `DemoConfig`, validated before anything trains."""

    def __init__(self, config: DemoConfig) -> None:
        work = config.work_dir
        self.tokenizer_dir = work / "tokenizer"
        self.pretrain = parse_job_config(
            _merge(
                config.pretrain,
                {"tokenizer": str(self.tokenizer_dir), "output_dir": str(work / "pretrain"), "export_dir": None},
            ),
            PretrainConfig,
            source="pretrain",
        )
        dense = work / "pretrain" / "model"
        self.upcycle = parse_job_config(
            _merge(
                config.upcycle, {"model": {"dir": str(dense)}, "output_dir": str(work / "upcycle"), "export_dir": None}
            ),
            UpcycleConfig,
            source="upcycle",
        )
        self.moe = work / "upcycle" / "model"
        self.prompts = {
            task: parse_job_config(
                _merge(
                    _merge(config.prompt, overrides),
                    {
                        "model": {"dir": str(self.moe)},
                        "task": {"name": task},
                        "output_dir": str(work / f"prompt-{task}"),
                    },
                ),
                PromptJobConfig,
                source=f"prompt_tasks.{task}",
            )
            for task, overrides in config.prompt_tasks.items()
        }


def tokenizer_lines(num_documents: int) -> Iterator[str]:
    """What the demo tokenizer learns from: generated documents and every instruction's words."""
    yield from iter_documents(num_documents)
    for words in INSTRUCTIONS.values():
        yield from words.parts().values()


def load_served(model_dir: Path) -> tuple[Seq2SeqLM, Tokenizer]:
    """The model and tokenizer of a directory, loaded as the server loads them (packed CPU weights,
    dtype as stored, int8 experts of a quantised model run by the int8 kernels)."""
    return load_for_inference(model_dir, device="cpu", progress=False).model, load_tokenizer(model_dir)


def score_tasks(
    model: Seq2SeqLM,
    tokenizer: Tokenizer,
    prompts: dict[str, Path | None],
    *,
    num_examples: int,
    instructed: bool = False,
) -> dict[str, float]:
    """Held-out (`test`) exact match per task: with each task's prompt file, or (`instructed`,
    prompt None) with the instruction words."""
    scores = {}
    for task, prompt_path in prompts.items():
        examples = generate_task(task, "test", num_examples=num_examples)
        soft: SoftPrompt | None = None
        if prompt_path is not None:
            soft = parse_soft_prompt(
                prompt_path.read_bytes(),
                d_model=model.config.d_model,
                dtype=model.embed.weight.dtype,
                max_virtual_tokens=512,
            )
        if instructed:
            examples = [with_instruction(example) for example in examples]
        score = evaluate_tasks(model, tokenizer, examples, prompt=soft, batch_size=100, max_new_tokens=24)
        scores[task] = round(score[task].accuracy, 4)
    return scores


def evaluate_model_dir(
    model_dir: Path, prompts: dict[str, Path | None], *, num_examples: int, instructed: bool = False
) -> dict[str, float]:
    """`score_tasks` of a model directory loaded as the server loads it."""
    return score_tasks(*load_served(model_dir), prompts, num_examples=num_examples, instructed=instructed)


def build_demo(config: DemoConfig, *, device: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage (resuming where a previous run stopped) and ship `config.out`; returns the
    report written to `out/eval.json`."""
    plan = DemoPlan(config)
    # Seconds each stage has cost so far, summed over resumed runs (a finished stage costs ~0 when
    # rerun), so the report states what building the model took, not what the last rerun did.
    timings_file = config.work_dir / TIMINGS_FILE
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def timed(name: str, run: Callable[[], Any], run_dir: Path | None = None) -> Any:
        if run_dir is not None and not run_dir.exists():
            timings[name] = 0.0  # started afresh (e.g. its run directory was deleted)
        begin = time.monotonic()
        log(f"== {name}")
        result = run()
        timings[name] = round(timings.get(name, 0.0) + time.monotonic() - begin, 1)
        log(f"== {name}: {timings[name]:.0f} s")
        timings_file.parent.mkdir(parents=True, exist_ok=True)
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")
        return result

    if not (plan.tokenizer_dir / "spiece.model").is_file():
        timed(
            "tokenizer",
            lambda: train_sentencepiece(
                tokenizer_lines(config.tokenizer_documents),
                plan.tokenizer_dir / "spiece.model",
                vocab_size=config.tokenizer_pieces,
                split_digits=True,
                user_defined_symbols=NUMERAL_PIECES,
            ),
        )
    dense = timed(
        "pretrain (dense, multi-task)", lambda: pretrain(plan.pretrain, device=device), plan.pretrain.output_dir
    )
    dense_scores = timed(
        "score dense (instructed)",
        lambda: evaluate_model_dir(
            dense, dict.fromkeys(plan.prompts), num_examples=config.num_eval_examples, instructed=True
        ),
    )
    log(f"dense model, instructed, test exact match: {dense_scores}")
    moe = timed("upcycle (MoE)", lambda: upcycle(plan.upcycle, device=device), plan.upcycle.output_dir)
    prompt_files = {}
    for task, prompt_config in plan.prompts.items():
        result = timed(
            f"prompt {task}", partial(run_prompt_job, prompt_config, device=device), prompt_config.output_dir
        )
        prompt_files[task] = result.prompt_path
    return ship(config, moe, prompt_files, dense_scores, timings, log)


def ship(
    config: DemoConfig,
    moe: Path,
    prompt_files: dict[str, Path],
    dense_scores: dict[str, float],
    timings: dict[str, float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write `config.out` (model in `ship_dtype`, prompts, eval.json) and score what was written."""
    model, _ = load_model(moe, dtype="float32", device="cpu", pack=False)
    staging = config.out.with_name(config.out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_model_dir(model, staging, tokenizer_dir=moe, producer=PRODUCER, dtype=getattr(torch, config.ship_dtype))
    (staging / "prompts").mkdir()
    shipped: dict[str, Path | None] = {}
    for task, path in prompt_files.items():
        shipped[task] = Path(shutil.copyfile(path, staging / "prompts" / f"{task}.safetensors"))
    served, tokenizer = load_served(staging)  # once, for both scorings
    prompted = score_tasks(served, tokenizer, shipped, num_examples=config.num_eval_examples)
    instructed = score_tasks(
        served, tokenizer, dict.fromkeys(shipped), num_examples=config.num_eval_examples, instructed=True
    )
    report = {
        "split": "test",
        "num_examples_per_task": config.num_eval_examples,
        "exact_match_with_prompt": prompted,
        "exact_match_instructed_moe": instructed,
        "exact_match_instructed_dense": dense_scores,
        "dtype": config.ship_dtype,
        "stage_seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
    }
    (staging / EVAL_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(config.out, ignore_errors=True)
    staging.rename(config.out)
    log(f"wrote {config.out}: exact match with prompts {prompted}")
    return report


def _cmd_demo(args: argparse.Namespace) -> int:
    data = read_config_file(args.config)
    for key in ("out", "work_dir"):
        if getattr(args, key) is not None:
            data[key] = str(getattr(args, key))
    config = parse_job_config(data, DemoConfig, source=str(args.config))
    report = build_demo(config, device=args.device)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def add_demo_command(commands: Any) -> None:
    """``cpm2 train demo``."""
    p = commands.add_parser(
        "demo",
        help="build the demo model: tokenizer, dense multi-task pretraining, MoE upcycling, one prompt per task",
        description="Run every stage of training/configs/demo.yaml and write the served demo model directory.",
    )
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="demo config (.yaml, .json or .toml)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="shipped model directory (default: config)")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR", help="stage run directories (default: config)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: CUDA when available")
    p.set_defaults(handler=_cmd_demo)
