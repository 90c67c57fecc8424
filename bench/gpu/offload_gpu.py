"""InfMoE offloading on one GPU: every offload measurement of `bench/offload.py`, plus H2D link use.

    PYTHONPATH=. python3 bench/gpu/offload_gpu.py --out $OUT      # on the lent H100 / H200

Made to finish within 8 minutes on one H100 with the packages of the lent machine's image (torch,
safetensors, sentencepiece, tqdm, rich; transformers + accelerate for the peer row). Writes
`offload_gpu.json` (and the models under `--work`, default /tmp/cpm2-gpu-bench):

1. pinned host → device bandwidth (1 GiB copies on a side stream, CUDA events);
2. a Switch-like model (switch-base-like shape, 64 experts in 12 MoE layers, bf16, 7.2 GB of
   experts) and a CPM-2-architecture model (d_model 1024, gated d_ff 2048, 64 experts in all 12
   blocks, 9.7 GB of experts): resident vs offloaded at 50 / 25 / 10 % of the experts on the GPU,
   batch 1, 16 and 64, teacher-forced random tokens; tok/s, bytes/token, hit rate, and H2D link
   utilisation = bytes moved per second / measured pinned bandwidth (target ≥ 0.8 when
   transfer-bound);
3. order policies at 25 %: step time ÷ max(compute-only, transfer-only) (target ≤ 1.15);
4. peer: HF transformers + accelerate with every expert kept in CPU RAM (expert-granular
   `device_map`, execution on the GPU), batch 1 and 16, if time allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.offload_common import decode_cpm2, load_cpm2
from engine.config import ModelConfig
from engine.summary import summarize
from engine.weights.init import write_random_model
from engine.weights.presets import get_preset

DEADLINE_SECONDS = 7.5 * 60


def pinned_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of pinned host → device copies on a side stream."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = 0.0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            dev.copy_(host, non_blocking=True)
            end.record(stream)
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1000) / 1e9)
    return best


def models(work: Path) -> dict[str, tuple[Path, ModelConfig]]:
    switch = get_preset("switch-base-like").config
    assert switch.moe is not None
    switch = switch.replace(moe=dataclasses.replace(switch.moe, num_experts=64))
    small = get_preset("small").config
    assert small.moe is not None
    cpm2 = small.replace(
        d_model=1024,
        num_heads=16,
        d_kv=64,
        d_ff=2048,
        vocab_size=8192,
        moe=dataclasses.replace(small.moe, num_experts=64),
    )
    out = {}
    for name, config in (("switch", switch), ("cpm2", cpm2)):
        path = work / name
        if not (path / "config.json").exists():
            write_random_model(config, path, dtype="bfloat16", progress=False)
        out[name] = (path, config)
    return out


def run_model(
    path: Path, config: ModelConfig, bandwidth: float, args: argparse.Namespace, begin: float
) -> dict[str, Any]:
    summary = summarize(config, torch.bfloat16)
    rows: list[dict[str, Any]] = []
    compute_only: dict[int, float] = {}
    for batch in args.batches:
        for budget in [None, *args.budgets]:
            if time.time() - begin > DEADLINE_SECONDS:
                break
            loaded = load_cpm2(path, budget=budget, device="cuda", host_tier="pinned")
            try:
                runs = [decode_cpm2(loaded, batch=batch, steps=args.steps) for _ in range(args.repeats)]
            finally:
                loaded.close()
            tps = statistics.median(r.tokens_per_second for r in runs)
            run = sorted(runs, key=lambda r: r.tokens_per_second)[len(runs) // 2]
            row: dict[str, Any] = {"batch": batch, "budget": budget or "100%", **run.to_dict()}
            row["tokens_per_second"] = tps
            if budget is None:
                compute_only[batch] = run.seconds / args.steps
            elif run.stats is not None:
                moved_per_s = run.stats.bytes_moved / run.seconds
                row["h2d_gb_s"] = moved_per_s / 1e9
                row["h2d_utilisation"] = moved_per_s / 1e9 / bandwidth
            rows.append(row)
            print(f"  batch {batch} budget {row['budget']}: {tps:.1f} tok/s", flush=True)
    orders = []
    for batch in args.batches:
        for order in ("infmoe", "cached-first", "index"):
            if time.time() - begin > DEADLINE_SECONDS or batch not in compute_only:
                break
            loaded = load_cpm2(path, budget="25%", device="cuda", host_tier="pinned", order=order)
            try:
                run = decode_cpm2(loaded, batch=batch, steps=args.steps)
            finally:
                loaded.close()
            assert run.stats is not None
            step = run.seconds / args.steps
            transfer = run.stats.bytes_moved / args.steps / (bandwidth * 1e9)
            orders.append(
                {
                    "batch": batch,
                    "order": order,
                    "step_seconds": step,
                    "compute_only_seconds": compute_only[batch],
                    "transfer_only_seconds": transfer,
                    "ratio_to_limit": step / max(compute_only[batch], transfer),
                    "experts": run.stats.to_dict(),
                }
            )
            print(f"  order {order} batch {batch}: step/limit {orders[-1]['ratio_to_limit']:.2f}", flush=True)
    return {"summary": summary.to_dict(), "budgets": rows, "orders": orders}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpm2-gpu-bench"))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--budgets", type=lambda s: s.split(","), default=["50%", "25%", "10%"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    begin = time.time()
    device = torch.device("cuda")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "pinned_h2d_gb_s": pinned_bandwidth(device),
        "models": {},
    }
    print(f"pinned H2D: {report['pinned_h2d_gb_s']:.1f} GB/s", flush=True)
    for name, (path, config) in models(args.work).items():
        print(f"{name}: {path}", flush=True)
        report["models"][name] = run_model(path, config, report["pinned_h2d_gb_s"], args, begin)
    report["wall_seconds"] = time.time() - begin
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload_gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'offload_gpu.json'} in {report['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
