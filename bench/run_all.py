"""Run every benchmark in `bench/` (`make bench`), each in its own process.

Arguments are passed to every benchmark, e.g. `python -m bench.run_all --quick`. Each benchmark
prints its table and writes its JSON (and plot) under `bench/results/`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

#: Benchmark invocations (module, then its own arguments), run in this order; each module has a
#: `main` and accepts `--quick`.
BENCHMARKS: tuple[tuple[str, ...], ...] = (
    ("bench.decode_vs_hf",),
    ("bench.decode_vs_hf", "--model", "nllb-200-distilled-600m", "--int8"),
    ("bench.offload",),
    ("bench.offload_peers",),
    ("bench.int8_kernels",),
    ("bench.int4_kernels",),
    ("bench.quant",),
    ("bench.prediction",),
    ("bench.plan_validation",),
    ("bench.decode_vs_ct2",),
    ("bench.compiled_step",),
    ("bench.decoder_cache",),
    ("bench.sampling",),
    ("bench.serve_load",),
    ("bench.serve_open_loop",),
    ("bench.burst",),
    ("bench.abuse",),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    failed = []
    for invocation in BENCHMARKS:
        command = [*invocation, *args]
        print(f"== python -m {' '.join(command)}", flush=True)
        # A fresh process per benchmark: no thread-pool, allocator or cache state carries over.
        if subprocess.call([sys.executable, "-m", *command]) != 0:
            failed.append(" ".join(invocation))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
