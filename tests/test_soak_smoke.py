"""The soak test runs end to end for ~10 s on the tiny model and writes the report it promises.

Only the report's structure and the absence of errors are checked: RSS growth over ten seconds is
start-up, not a leak, and timings never decide a test (STYLE.md §14).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import main
from bench.soak_mix import WEIGHTS


@pytest.mark.slow
def test_soak_runs_and_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "soak.json", tmp_path / "soak.png"
    argv = ["--model", str(tiny_model_dir), "--minutes", "0.17", "--concurrency", "2", "--sample-seconds", "1"]
    main([*argv, "--out", str(out), "--plot", str(plot), "--work-dir", str(tmp_path / "work")])

    report = json.loads(out.read_text())
    assert report["benchmark"] == "soak"
    assert report["num_errors"] == 0, report["error_examples"]
    assert report["num_server_log_problems"] == 0, report["server_log_examples"]
    assert report["num_requests_stuck_at_idle"] == 0
    assert report["num_requests"] == sum(row["requests"] for row in report["requests"].values()) > 0
    for row in report["requests"].values():
        assert {"requests", "ok", "refused_as_expected", "errors", "p50_ms", "p99_ms"} <= row.keys()
    # The warm-up ran every operation once, and every one of them succeeded.
    assert len(report["warm_up"]) >= len(WEIGHTS)
    assert all(outcome["error"] is None for outcome in report["warm_up"])
    assert {"warm_mib", "end_mib", "growth_pct", "anon_warm_mib", "slope_after_warm_mib_per_h"} <= report["rss"].keys()
    assert {"warm", "end", "non_socket_warm", "non_socket_end", "idle_before", "idle_after"} <= report["fds"].keys()
    assert {"requests_per_s", "generated_tokens_per_s"} <= report["throughput"].keys()
    assert {"is_rss_met", "is_fds_met", "is_errors_met"} <= report["targets"].keys()
    assert report["targets"]["is_errors_met"] is True
    assert len(report["samples"]) >= 5
    assert {"t_s", "rss_mib", "fds", "requests"} <= report["samples"][0].keys()
    # The server drained on SIGTERM and exited cleanly.
    counters = report["server_counters"]
    assert counters["cpm2_prompts_registered"] == 4  # only the shared prompts: each upload was deleted
    assert counters["server_exit_status"] == 0
    assert plot.stat().st_size > 0
