"""Prompt tuning vs full fine-tuning on the task suite, and CPM-2's prompt-position study.

    python -m training.experiments.prompt_vs_finetune [--model-dir DIR] [--tasks add same] [--steps 150]

Without ``--model-dir`` a `tiny` model is first pretrained with span corruption (`cpm2 train
pretrain`'s job) on the generated corpus. Then, per task and with the same data, step budget and
test-split evaluation (greedy, exact match, through the engine's `Generator` from the written
artifacts: the fine-tuned model directory, the served prompt file), it runs full fine-tuning and
prompt tuning with the prompt in front, at the back, front+back, and for `same` also between the
sentences (infix) and front+infix+back.

Peak memory (CPU: there is no `torch.cuda.max_memory_allocated`): after its job, each run (its own
subprocess) probes 3 training steps of the same model, data and trainer: resident weights (and
prompt) plus the largest growth of glibc's heap in use (``mallinfo2``) sampled after every tensor
operation (a `TorchDispatchMode`) — gradients, optimizer state, activations. It also reports
``state_bytes`` (weights + gradients + AdamW's two moments of what trains; what dominates at scale)
and the process's ``ru_maxrss`` growth over the whole job, which at this model size is ~120 MiB of
PyTorch runtime set-up in every run and says nothing about the method. Results go to
bench/results/prompt_tuning.json and docs/prompt_tuning.png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# The prompts: 8 virtual tokens in all (0.08% of the tiny model's 640k parameters).
POSITIONS: dict[str, dict[str, int]] = {
    "front": {"prefix_length": 8, "infix_length": 0, "suffix_length": 0},
    "back": {"prefix_length": 0, "infix_length": 0, "suffix_length": 8},
    "front+back": {"prefix_length": 4, "infix_length": 0, "suffix_length": 4},
    "infix": {"prefix_length": 0, "infix_length": 8, "suffix_length": 0},
    "front+infix+back": {"prefix_length": 3, "infix_length": 2, "suffix_length": 3},
}
PAIR_ONLY = ("infix", "front+infix+back")
FLOAT_BYTES = 4
# The longest answer (an 8-digit number in Chinese numerals) is 16 tokens with the demo tokenizer;
# a smaller budget cuts long answers and scores them wrong whatever the method.
MAX_NEW_TOKENS = 24
_PROBE_STEPS = 3  # the first step allocates the optimizer state; later ones show the steady state


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc `mallinfo2`): where CPU tensors live."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class _PeakHeap(TorchDispatchMode):
    """Samples `_heap_in_use` after every tensor operation (forward, backward, optimizer) and keeps the
    maximum: CPU's stand-in for `torch.cuda.max_memory_allocated`."""

    peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def _peak_training_bytes(spec: dict[str, Any], data: dict[str, Any]) -> int:
    """Peak tensor memory of `_PROBE_STEPS` training steps: resident weights (and prompt) plus the
    largest growth of the heap over them (gradients, optimizer state, activations)."""
    import gc

    import torch

    from training.config import parse_job_config
    from training.job import DataShard, build_model
    from training.jobs.prompt import PromptJobConfig, build_prompted_model, prompt_data
    from training.jobs.task_data import task_batches
    from training.losses import seq2seq_lm_loss
    from training.soft_prompt import prompted_lm_loss
    from training.trainer import Trainer

    probe = {**data, "output_dir": str(Path(spec["out"]) / "memory_probe"), "eval_every": 0}
    shard = DataShard(rank=0, world_size=1, micro_batch_size=spec["batch_size"], seed=0)
    config = parse_job_config(probe, PromptJobConfig) if "prompt" in probe else None
    if config is not None:
        model: torch.nn.Module = build_prompted_model(config, torch.device("cpu"))
        trainer = Trainer(
            config=config,
            model=model,
            loss_fn=prompted_lm_loss,
            data=prompt_data(config, shard),
            trainable=lambda name: name.startswith("prompt."),
        )
    else:
        ft = parse_job_config(probe, _finetune_config())
        model = build_model(ft.model, torch.device("cpu"))
        data_it = task_batches(ft.task, ft.model, shard)
        trainer = Trainer(config=ft, model=model, loss_fn=seq2seq_lm_loss, data=data_it, trainable=lambda _: True)
    resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    gc.collect()
    before = _heap_in_use()
    with _PeakHeap() as peak:
        for _ in range(_PROBE_STEPS):
            trainer._train_step()  # the job's own step (no checkpoint or log I/O in the window)
    return resident + max(peak.peak - before, 0)


def _finetune_config() -> Any:
    from training.jobs.finetune import FinetuneJobConfig

    return FinetuneJobConfig


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run (in this process) and its test-split evaluation."""
    import torch

    from engine.prompts import parse_soft_prompt
    from engine.tokenizer import load_tokenizer
    from engine.weights.loader import load_model
    from training.config import parse_job_config
    from training.evaluate import evaluate_tasks
    from training.jobs.finetune import FinetuneJobConfig, run_finetune_job
    from training.jobs.prompt import PromptJobConfig, run_prompt_job
    from training.jobs.task_data import TaskSpec, eval_examples

    # One thread: on a shared CPU, extra OpenMP threads spin and make steps several times slower.
    torch.set_num_threads(1)
    base = Path(spec["model_dir"])
    rss0 = _rss_bytes()
    data: dict[str, Any] = {
        "model": {"dir": str(base)},
        "task": {"name": spec["task"], "num_eval_examples": spec["num_eval"], "max_new_tokens": MAX_NEW_TOKENS},
        "steps": spec["steps"],
        "batch_size": spec["batch_size"],
        "log_every": 10,
        "output_dir": spec["out"],
        "progress": False,
        "schedule": {"name": "constant"},
    }
    start = time.perf_counter()
    prompt = None
    if spec["method"] == "finetune":
        data["optimizer"] = {"name": "adamw", "lr": spec["finetune_lr"], "weight_decay": 0.01}
        model_dir = run_finetune_job(parse_job_config(data, FinetuneJobConfig), device="cpu")
    else:
        data["optimizer"] = {"name": "adamw", "lr": spec["prompt_lr"], "weight_decay": 0.01}
        data["prompt"] = POSITIONS[spec["method"]]
        result = run_prompt_job(parse_job_config(data, PromptJobConfig), device="cpu")
        model_dir, prompt = base, result.prompt_path.read_bytes()
    train_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0  # ru_maxrss is KiB on Linux
    peak_tensor = _peak_training_bytes(spec, data)
    model, _ = load_model(model_dir, dtype="float32", pack=False)
    num_params = sum(p.numel() for p in model.parameters())
    served = None
    if prompt is not None:
        served = parse_soft_prompt(prompt, d_model=model.config.d_model, dtype=torch.float32, max_virtual_tokens=64)
    trainable = num_params if served is None else sum(t.numel() for t in served.tensors().values())
    test = eval_examples(TaskSpec.model_validate(data["task"]), split="test")
    scores = evaluate_tasks(
        model, load_tokenizer(base), test, prompt=served, batch_size=64, max_new_tokens=MAX_NEW_TOKENS
    )
    return {
        "task": spec["task"],
        "method": spec["method"],
        "accuracy": scores[spec["task"]].accuracy,
        "num_test": len(test),
        "trainable_params": trainable,
        "model_params": num_params,
        "trainable_share": trainable / num_params,
        "peak_rss_delta_bytes": peak,
        "peak_tensor_bytes": peak_tensor,
        # Weights (all) + gradients and two AdamW moments (trainable only).
        "state_bytes": FLOAT_BYTES * (num_params + 3 * trainable),
        "train_seconds": train_s,
    }


def _pretrain(work: Path, steps: int) -> Path:
    from training.config import parse_job_config
    from training.jobs.pretrain import PretrainConfig, pretrain

    config = parse_job_config(
        {
            "model": {"preset": "tiny"},
            "span": {"encoder_length": 64, "decoder_length": 16},
            "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 20},
            "steps": steps,
            "batch_size": 32,
            "log_every": 20,
            "output_dir": str(work / "pretrain"),
            "progress": False,
        },
        PretrainConfig,
    )
    return pretrain(config, device="cpu")


def _subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "training.experiments.prompt_vs_finetune", "--run-one", json.dumps(spec)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)  # stderr: the terminal
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: prompt (front) vs fine-tuning ratios and the targets."""
    summary: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        by_method = {r["method"]: r for r in runs if r["task"] == task}
        ft, pt = by_method["finetune"], by_method["front"]
        best = max((r for m, r in by_method.items() if m != "finetune"), key=lambda r: r["accuracy"])
        ratio = pt["accuracy"] / ft["accuracy"] if ft["accuracy"] else None
        summary[task] = {
            "finetune_accuracy": ft["accuracy"],
            "prompt_front_accuracy": pt["accuracy"],
            "best_prompt": best["method"],
            "best_prompt_accuracy": best["accuracy"],
            "accuracy_ratio": ratio,
            "param_share": pt["trainable_share"],
            "peak_tensor_memory_ratio": pt["peak_tensor_bytes"] / ft["peak_tensor_bytes"],
            "peak_rss_ratio": pt["peak_rss_delta_bytes"] / ft["peak_rss_delta_bytes"],
            "state_memory_ratio": pt["state_bytes"] / ft["state_bytes"],
            "targets_met": {
                "accuracy>=95%": ratio is not None and ratio >= 0.95,
                "params<=0.1%": pt["trainable_share"] <= 0.001,
                "peak_memory<=60%": pt["peak_tensor_bytes"] / ft["peak_tensor_bytes"] <= 0.6,
            },
        }
    return summary


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    methods = ["finetune", *POSITIONS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [next((r["accuracy"] for r in runs if r["task"] == t and r["method"] == method), 0.0) for t in tasks]
        axes[0].bar([x + i * width for x in range(len(tasks))], values, width, label=method)
    axes[0].set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks)
    axes[0].set_ylabel("test exact match")
    axes[0].set_title("accuracy: fine-tuning vs prompt positions")
    axes[0].legend(fontsize=7)
    for r in runs:
        if r["method"] in ("finetune", "front"):
            axes[1].plot(r["loss_steps"], r["losses"], label=f"{r['task']} {r['method']}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss")
    axes[1].set_title("training loss")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a trained model; default: pretrain a tiny one first")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=["add", "same"])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-eval", type=int, default=200, help="test examples per task")
    parser.add_argument("--prompt-lr", type=float, default=0.3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--work", type=Path, default=Path("runs/prompt_vs_finetune"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/prompt_tuning.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/prompt_tuning.png"))
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    import torch

    from training.metrics_log import read_metrics

    torch.set_num_threads(1)
    started = time.perf_counter()
    model_dir = args.model_dir or _pretrain(args.work, args.pretrain_steps)
    pretrain_s = time.perf_counter() - started
    runs: list[dict[str, Any]] = []
    for task in args.tasks:
        for method in ["finetune", *POSITIONS]:
            if method in PAIR_ONLY and task != "same":
                continue
            out = args.work / f"{task}-{method}"
            spec = {
                "task": task,
                "method": method,
                "model_dir": str(model_dir),
                "out": str(out),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "num_eval": args.num_eval,
                "prompt_lr": args.prompt_lr,
                "finetune_lr": args.finetune_lr,
            }
            if out.exists():
                shutil.rmtree(out)
            run = _subprocess(spec)
            log = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
            run.update(loss_steps=[r["step"] for r in log], losses=[r["loss"] for r in log])
            # Teacher-forced token accuracy of the last logged window: partial credit exact match hides.
            run["final_token_accuracy"] = log[-1]["accuracy"]
            run["final_loss"] = log[-1]["loss"]
            runs.append(run)
            print(
                f"{task:7s} {method:17s} acc {run['accuracy']:.3f}  params {run['trainable_share']:.5%}  "
                f"peak {run['peak_tensor_bytes'] / 2**20:.1f} MiB  {run['train_seconds']:.0f}s",
                flush=True,
            )
    result = {
        "command": "python -m training.experiments.prompt_vs_finetune " + " ".join(argv or sys.argv[1:]),
        "model_dir": str(model_dir),
        "pretrain_steps": 0 if args.model_dir else args.pretrain_steps,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "prompt_lr": args.prompt_lr,
        "finetune_lr": args.finetune_lr,
        "pretrain_seconds": pretrain_s,
        "total_seconds": time.perf_counter() - started,
        "runs": runs,
        "summary": summarise(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, args.plot)
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
