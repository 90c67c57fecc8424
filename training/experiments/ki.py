"""Knowledge inheritance vs training from scratch: steps a larger student needs with a small teacher.

    python -m training.experiments.ki [--teacher-steps 1200] [--student-steps 300] [--work-dir DIR]

1. A small dense teacher (d_model 64, 2+2 layers) is pretrained with span corruption (`cpm2 train
   pretrain`'s job) on the generated corpus (documents of seed 7), for 4x the students' steps: KI
   presupposes a teacher trained past the student's budget (the KI paper's teachers are finished
   models).
2. A larger dense student (d_model 128, 2+2 layers, 3x the parameters) is trained twice with
   `cpm2 train ki`'s job on the same documents (seed 0, which the teacher never saw), the same
   initialisation, batches and schedule: once with α_0 = 0 (the KI loss is then exactly the LM
   loss and the teacher never runs: from scratch) and once with KI (α_0 = 1, T = 2, α reaching 0 at
   44% of the steps, as in the KI paper's script; `--distill-share` changes it).
3. Two measures of the student's LM loss (cross-entropy on span-corruption targets), each giving
   the first step at which KI reaches the from-scratch run's final loss, as a share of the steps
   (the issue's target: ≤ 60%):
   * held-out: the job's `eval_loss` on 4 fixed batches of documents no model trained on (seed 1),
     every 10 steps — the same batches each time, so the curve carries no data noise;
   * training stream: `lm_loss` of every step (each batch is new when it is scored), trailing
     mean of 20 steps — noisier: the last steps' batches set the target by chance.
   Results go to bench/results/ki.json and docs/ki.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.tokenizer import load_tokenizer
from engine.weights.init import write_random_model
from engine.weights.loader import load_model
from training.config import parse_job_config
from training.jobs.ki import KIConfig, train_ki
from training.jobs.pretrain import PretrainConfig, held_out_eval_fn, pretrain
from training.metrics_log import read_metrics

TEACHER = ModelConfig(
    vocab_size=1152, d_model=64, num_heads=4, d_kv=16, d_ff=128, num_encoder_layers=2, num_decoder_layers=2
)
STUDENT_OVERRIDES: dict[str, Any] = {"d_model": 128, "num_heads": 4, "d_kv": 32, "d_ff": 256, "moe": None}
"""Reshapes the `tiny` preset (same 2+2 layers and vocabulary) into a dense student twice as wide."""
SPAN = {"encoder_length": 64, "decoder_length": 32}
SMOOTHING = 20
"""Steps in the trailing mean applied to both training-stream loss curves."""
EVAL_EVERY = 10
HELD_OUT_BATCHES = 4
TARGET_SHARE = 0.6


def _common(out: Path, *, steps: int, batch_size: int, seed: int) -> dict[str, Any]:
    return {
        "optimizer": {"lr": 2e-3, "weight_decay": 0.01},
        "schedule": {"name": "linear", "warmup_steps": 20, "min_lr_ratio": 0.1},
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "log_every": 1,
        "output_dir": str(out),
        "progress": False,
        "span": SPAN,
    }


def smooth(values: list[float], window: int = SMOOTHING) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _metric(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def _reach(ki: list[tuple[int, float]], target: float, steps: int) -> dict[str, Any]:
    reached = next((step for step, loss in ki if loss <= target), None)
    share = None if reached is None else reached / steps
    return {"ki_steps": reached, "ki_share": share, "target_met": share is not None and share <= TARGET_SHARE}


def _num_params(model_dir: Path) -> int:
    model, _ = load_model(model_dir, dtype="float32", pack=False)
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher, then the two students; returns the results record."""
    work = args.work_dir
    timings: dict[str, float] = {}
    start = time.perf_counter()
    write_random_model(TEACHER, work / "teacher_init", progress=False)
    teacher_data = {
        "model": {"dir": str(work / "teacher_init")},
        **_common(work / "teacher_run", steps=args.teacher_steps, batch_size=args.batch_size, seed=7),
        "export_dir": str(work / "teacher"),
    }
    teacher_dir = pretrain(parse_job_config(teacher_data, PretrainConfig), device="cpu")
    timings["teacher_s"] = time.perf_counter() - start
    teacher_final = smooth([loss for _, loss in _metric(work / "teacher_run", "loss")])[-1]
    print(f"teacher: {args.teacher_steps} steps, final loss {teacher_final:.3f}", flush=True)

    train: dict[str, list[float]] = {}
    held_out: dict[str, list[tuple[int, float]]] = {}
    configs: dict[str, KIConfig] = {}
    for name, alpha0 in (("scratch", 0.0), ("ki", 1.0)):
        start = time.perf_counter()
        data = {
            "model": {"preset": "tiny", "init_seed": 0},
            **_common(work / name, steps=args.student_steps, batch_size=args.batch_size, seed=0),
            "eval_every": EVAL_EVERY, "held_out": {"num_batches": HELD_OUT_BATCHES},
            "ki": {"teacher": str(teacher_dir), "alpha0": alpha0, "temperature": 2.0,
                   "distill_steps": round(args.distill_share * args.student_steps),
                   "student_overrides": STUDENT_OVERRIDES},
        }  # fmt: skip
        configs[name] = parse_job_config(data, KIConfig)
        train_ki(configs[name], device="cpu")
        timings[f"{name}_s"] = time.perf_counter() - start
        train[name] = [loss for _, loss in _metric(work / name, "lm_loss")]
        held_out[name] = _metric(work / name, "eval_loss")
        print(f"{name}: final lm_loss {smooth(train[name])[-1]:.3f}, held-out {held_out[name][-1][1]:.3f}", flush=True)

    # The teacher on the students' held-out batches (documents no model trained on).
    teacher, _ = load_model(teacher_dir, dtype="float32", pack=False)
    eval_fn = held_out_eval_fn(configs["scratch"], load_tokenizer(teacher_dir))
    assert eval_fn is not None  # held_out.num_batches > 0
    with torch.no_grad():
        teacher_held_out = eval_fn(teacher, 0)["loss"]
    steps = args.student_steps
    train_target, held_out_target = smooth(train["scratch"])[-1], held_out["scratch"][-1][1]
    smoothed_ki = list(enumerate(smooth(train["ki"]), start=1))
    return {
        "teacher": {"config": TEACHER.to_dict(), "steps": args.teacher_steps, "final_loss": teacher_final,
                    "held_out_loss": teacher_held_out, "parameters": _num_params(teacher_dir)},
        "student": {"overrides_of_tiny": STUDENT_OVERRIDES, "steps": steps,
                    "parameters": _num_params(work / "ki" / "model")},
        "ki": {"alpha0": 1.0, "temperature": 2.0, "distill_steps": configs["ki"].distill_steps()},
        "batch_size": args.batch_size, "span": SPAN, "target_share": TARGET_SHARE,
        "held_out": {"eval_every": EVAL_EVERY, "batches": HELD_OUT_BATCHES, "scratch_final": held_out_target,
                     "ki_final": held_out["ki"][-1][1], **_reach(held_out["ki"], held_out_target, steps)},
        "train_stream": {"smoothing_window": SMOOTHING, "scratch_final": train_target,
                         "ki_final": smoothed_ki[-1][1], **_reach(smoothed_ki, train_target, steps)},
        "curves": {"train_lm_loss": train, "held_out_loss": held_out}, "timings_s": timings,
    }  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out and training-stream LM loss of both students, the targets and where KI reaches them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = (("scratch", "tab:gray", "from scratch"), ("ki", "tab:blue", "KI from the teacher"))
    teacher = result["teacher"]
    for ax, key, measure in ((axes[0], "held_out_loss", "held_out"), (axes[1], "train_lm_loss", "train_stream")):
        for name, color, label in styles:
            curve = result["curves"][key][name]
            if key == "held_out_loss":
                ax.plot([s for s, _ in curve], [v for _, v in curve], color=color, marker=".", label=label)
            else:
                steps = range(1, len(curve) + 1)
                ax.plot(steps, curve, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(steps, smooth(curve), color=color, label=f"{label} (trailing mean {SMOOTHING})")
        info = result[measure]
        ax.axhline(info["scratch_final"], color="tab:gray", linestyle=":", label="from-scratch final loss")
        teacher_loss = teacher["held_out_loss"] if measure == "held_out" else teacher["final_loss"]
        ax.axhline(teacher_loss, color="tab:green", linestyle="-.", linewidth=0.8,
                   label=f"teacher ({teacher['steps']} steps)")  # fmt: skip
        ax.axvline(result["ki"]["distill_steps"], color="tab:orange", linestyle="--", linewidth=0.8, label="α = 0")
        if info["ki_steps"] is not None:
            ax.axvline(
                info["ki_steps"], color="tab:blue", linestyle=":", label=f"KI reaches it ({info['ki_share']:.0%})"
            )
        ax.set_xlabel("student step")
        ax.set_title("held-out batches" if measure == "held_out" else "training stream (each batch new)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("student LM loss (span corruption)")
    axes[0].set_ylim(bottom=0.9 * teacher["held_out_loss"], top=8.0)
    title = f"KI: dense d_model 64 teacher → dense d_model 128 student, {result['student']['steps']} steps"
    fig.suptitle(f"{title}, α = 0 from step {result['ki']['distill_steps']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--distill-share", type=float, default=0.44, help="α reaches 0 at this share of the student's steps"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/ki.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/ki.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or Path(tmp)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    for measure in ("held_out", "train_stream"):
        info = result[measure]
        share = "never" if info["ki_steps"] is None else f"step {info['ki_steps']} ({info['ki_share']:.0%})"
        print(
            f"{measure}: from scratch {info['scratch_final']:.3f}, KI {info['ki_final']:.3f}; KI reaches the "
            f"from-scratch final loss at {share} of {result['student']['steps']} steps "
            f"(target <= {TARGET_SHARE:.0%}: {'met' if info['target_met'] else 'not met'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
