"""The burst bench runs end to end on the tiny model (2 bursts of 12) and writes the report it promises.

Only the report's structure and the absence of errors are checked: RSS over two small bursts is
start-up, not a verdict, and timings never decide a test (STYLE.md §14).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.burst import KINDS, main


@pytest.mark.slow
def test_burst_runs_and_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    argv = ["--model", str(tiny_model_dir), "--bursts", "2", "--concurrency", "12", "--refused-per-burst", "2"]
    status = main([*argv, "--out", str(out), "--work-dir", str(tmp_path / "work")])

    report = json.loads(out.read_text())
    assert report["benchmark"] == "burst"
    assert report["num_errors"] == 0, report["error_examples"]
    assert report["num_server_log_problems"] == 0, report["server_log_examples"]
    assert status == 0
    assert report["server_exit_status"] == 0  # drained on SIGTERM and exited cleanly
    assert report["num_requests"] == 2 * (12 + 2)
    assert {"cpu_model", "usable_cpus", "memory_gib"} <= report["machine"].keys()

    bursts = report["bursts"]
    assert [b["burst"] for b in bursts] == [1, 2]
    for burst in bursts:
        assert sum(n for counts in burst["statuses"].values() for n in counts.values()) == burst["requests"] == 14
        # The refusals ran under load too, each with its own status.
        assert burst["statuses"]["over_chars"] == {"422": 1}
        assert burst["statuses"]["over_payload_chunked"] == {"413": 1}
        assert burst["num_refused"] == 2
        assert set(burst["statuses"]) - {"over_chars", "over_payload_chunked"} <= KINDS.keys()
        assert all(set(counts) == {"200"} for kind, counts in burst["statuses"].items() if kind in KINDS)
        assert burst["health_failures"] == 0
        assert {"n", "p50", "p99", "max"} <= burst["health_ms"].keys()
        assert burst["health_ms"]["n"] > 0
        assert {"rss_mib", "rss_anon_mib", "fds"} <= burst["idle"].keys()

    # One RSS sample before the first burst and one after each; the verdict is reported, not judged.
    assert len(report["rss_series_mib"]) == len(report["fds_series"]) == 3
    verdict = report["verdict"]
    assert {"first_half_growth_mib", "second_half_growth_mib", "threshold_mib"} <= verdict.keys()
    assert isinstance(verdict["levels_off"], bool)

    # Inputs span 1 character to the server's limit (a prefix one character longer would cross it).
    ladder, limit = report["input_ladder"], report["server"]["max_input_tokens"]
    assert ladder[0]["chars"] == 1
    assert limit - 8 <= max(r["tokens"] for r in ladder) <= limit
    assert report["shapes"]["input_chars"]["min"] >= 1
