"""The float-vs-int8 benchmark runs end to end on the tiny preset and writes the report it promises.

Only the report's structure is checked, never a timing or a target (STYLE.md §14).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.quant import FORMATS, QUANTIZED, SYSTEMS, main


def test_quant_benchmark_writes_report(tmp_path: Path) -> None:
    out, plot, work = tmp_path / "quant.json", tmp_path / "quant.png", tmp_path / "work"
    argv = [
        "--preset",
        "tiny",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--batches",
        "1,4",
        "--demo-examples",
        "2",
        "--budget-share",
        "0.25",
    ]
    main([*argv, "--out", str(out), "--plot", str(plot), "--work-root", str(work)])

    report = json.loads(out.read_text())
    assert report["benchmark"] == "quant"
    assert {"cpu_model", "torch", "cpu_kernels"} <= report["machine"].keys()
    assert set(report["models"]) == set(FORMATS)
    assert report["budget_bytes"] > 0
    rows = report["decode"]
    assert len(rows) == 2 * len(SYSTEMS)
    assert {(r["format"], r["mode"], r["batch"]) for r in rows} == {(f, m, b) for f, m in SYSTEMS for b in (1, 4)}
    for row in rows:
        keys = {"tokens_per_second", "tokens_per_second_all", "bytes_read_per_token", "storage_bytes_per_token"}
        assert keys | {"hit_rate", "peak_rss_mib", "num_slots", "is_noisy"} <= row.keys()
        # Every offloaded run got the same budget and had to offload.
        assert (row["num_slots"] > 0) == (row["mode"] != "resident")
    quality = report["quality"]
    assert set(quality["random"]) == set(QUANTIZED)
    for fmt in QUANTIZED:
        assert {"logit_max_abs_diff", "top1_agreement"} <= quality["random"][fmt].keys()
    demo = quality["demo"]
    assert demo["num_examples_per_task"] == 2
    variants = {"int8", "int4-g32", "int4-g64", "int4-g128", "int8+d8", "int4-g64+d8"}
    assert set(demo["scores"]) == {"fp32"} | variants
    assert set(demo["drop_points"]) == set(demo["max_drop_points"]) == variants
    assert all(set(demo["scores"][v]) == set(demo["scores"]["fp32"]) for v in variants)
    for fmt in QUANTIZED:
        assert {f"{fmt}_over_bf16_cold_batch{b}" for b in (1, 4)} <= report["targets"].keys()
        assert f"demo_{fmt}_max_drop_points" in report["targets"]
    # The temporary models are gone; the plot was drawn when matplotlib is installed.
    assert report["work_dir_deleted"]
    assert not any(work.iterdir())
    assert not plot.exists() or plot.stat().st_size > 0


def test_kernel_benchmarks_write_their_reports(tmp_path: Path) -> None:
    """`bench.int8_kernels` and `bench.int4_kernels` run (one repeat, small pools) and record every
    candidate with its time and error, and the path the engine takes."""
    from bench import int4_kernels, int8_kernels

    for module, fmt in ((int8_kernels, "int8"), (int4_kernels, "int4")):
        out = tmp_path / f"{fmt}.json"
        module.main(["--quick", "--repeats", "1", "--pool-mib", "1", "--out", str(out)])
        report = json.loads(out.read_text())
        records = report["records"]
        assert {r["rows"] for r in records} == {1, 16, 256}
        for record in records:
            assert {"float", "engine"} <= record["candidates"].keys()
            assert record[f"{fmt}_vs_float_error"] > 0
            assert all(c["us"] > 0 and c["error"] >= 0 for c in record["candidates"].values())
        if fmt == "int4":
            assert report["format"] == "int4"
            assert "dequant" in records[0]["candidates"]
