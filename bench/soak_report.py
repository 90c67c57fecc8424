"""The soak test's report: requests by kind, the server's resources warm vs end, the targets, a plot.

Warm values are medians over 10-15 % of the run (allocator pools, thread pools and the shapes the
model sees have settled by then), end values medians over the last 5 %: single samples jitter with
whatever requests happen to be in flight.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.plots import save
from bench.soak_mix import Outcome

WARM_WINDOW = (0.10, 0.15)  # fraction of the run whose samples give the warm values
END_FRACTION = 0.05  # ...and the last fraction, the end values
TARGET_RSS_GROWTH_PCT = 5.0


def _window(samples: list[dict[str, float]], key: str, lo: float, hi: float) -> float:
    """Median of `key` over samples with lo <= t <= hi (the nearest sample when none falls inside)."""
    values = [s[key] for s in samples if lo <= s["t_s"] <= hi and key in s]
    if not values:
        values = [min(samples, key=lambda s: abs(s["t_s"] - (lo + hi) / 2)).get(key, float("nan"))]
    return float(statistics.median(values))


def summarize(
    outcomes: list[Outcome],
    warm_up_outcomes: list[Outcome],
    samples: list[dict[str, float]],
    wall: float,
    *,
    idle: dict[str, dict[str, float]],
    counters: dict[str, float],
    server_log_problems: list[str],
) -> dict[str, Any]:
    """Requests by kind, resource use warm vs end, throughput and the three targets."""
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({o.kind for o in outcomes}):
        mine = [o for o in outcomes if o.kind == kind]
        ok = [o.seconds for o in mine if o.error is None]
        q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else ok * 99 or [float("nan")] * 99
        by_kind[kind] = {
            "requests": len(mine),
            "ok": sum(o.error is None and not o.is_refusal for o in mine),
            "refused_as_expected": sum(o.is_refusal for o in mine),
            "errors": sum(o.error is not None for o in mine),
            "p50_ms": q[49] * 1000,
            "p99_ms": q[98] * 1000,
        }
    errors = [o for o in (*warm_up_outcomes, *outcomes) if o.error is not None]
    warm_lo, warm_hi = WARM_WINDOW[0] * wall, WARM_WINDOW[1] * wall
    end_lo = (1 - END_FRACTION) * wall

    def warm_end(key: str) -> tuple[float, float]:
        return _window(samples, key, warm_lo, warm_hi), _window(samples, key, end_lo, wall + 60)

    rss_warm, rss_end = warm_end("rss_mib")
    anon_warm, anon_end = warm_end("rss_anon_mib") if "rss_anon_mib" in samples[0] else (float("nan"),) * 2
    fds_warm, fds_end = warm_end("fds")
    files_warm, files_end = warm_end("files") if "files" in samples[0] else (fds_warm, fds_end)
    after_warm = [s for s in samples if s["t_s"] >= warm_lo]
    slope = float("nan")
    if len(after_warm) > 2:
        fit = statistics.linear_regression([s["t_s"] for s in after_warm], [s["rss_mib"] for s in after_warm])
        slope = fit.slope * 3600
    rss_growth = 100 * (rss_end - rss_warm) / rss_warm
    # Connections come and go with the clients, so "no fd growth" is judged on what the server keeps
    # open by itself: non-socket descriptors warm vs end, and every descriptor idle before vs after.
    fd_met = idle["after"]["fds"] <= idle["before"]["fds"] and files_end <= files_warm
    generated = counters.get("cpm2_generation_tokens_total", float("nan"))
    # Requests the server still holds once every client has gone: each one is a leak.
    num_stuck = int(sum(counters.get(f"cpm2_requests_{n}", 0.0) for n in ("in_flight", "running", "waiting")))
    return {
        "duration_s": wall,
        "requests": by_kind,
        "num_requests": len(outcomes),
        "num_errors": len(errors),
        "error_examples": [f"{o.kind}: {o.error}" for o in errors[:20]],
        "num_requests_stuck_at_idle": num_stuck,
        "num_server_log_problems": len(server_log_problems),
        "server_log_examples": server_log_problems[:10],
        "throughput": {"requests_per_s": len(outcomes) / wall, "generated_tokens_per_s": generated / wall},
        "rss": {
            "warm_mib": rss_warm,
            "end_mib": rss_end,
            "growth_pct": rss_growth,
            "anon_warm_mib": anon_warm,
            "anon_end_mib": anon_end,
            "slope_after_warm_mib_per_h": slope,
        },
        "fds": {
            "warm": fds_warm,
            "end": fds_end,
            "non_socket_warm": files_warm,
            "non_socket_end": files_end,
            "idle_before": idle["before"]["fds"],
            "idle_after": idle["after"]["fds"],
        },
        "server_counters": counters,
        "targets": {
            "rss_growth_pct_max": TARGET_RSS_GROWTH_PCT,
            "is_rss_met": rss_growth <= TARGET_RSS_GROWTH_PCT,
            "is_fds_met": fd_met,
            "is_errors_met": not errors and not server_log_problems and not num_stuck,
        },
    }


def tables(report: dict[str, Any], title: str) -> tuple[Table, Table]:
    requests = Table(title=title)
    for name in ("kind", "requests", "ok", "refused (expected 4xx)", "errors", "p50 ms", "p99 ms"):
        requests.add_column(name, justify="right" if name != "kind" else "left")
    for kind, row in report["requests"].items():
        requests.add_row(
            kind,
            str(row["requests"]),
            str(row["ok"]),
            str(row["refused_as_expected"]),
            str(row["errors"]),
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
        )
    rss, fds, targets = report["rss"], report["fds"], report["targets"]

    def met(is_met: bool) -> str:
        return "met" if is_met else "NOT met"

    resources = Table(title="server process, warm (10-15 % of the run) vs end (last 5 %)")
    for name in ("", "warm", "end", "change", "target"):
        resources.add_column(name, justify="right" if name else "left")
    resources.add_row(
        "RSS MiB",
        f"{rss['warm_mib']:.0f}",
        f"{rss['end_mib']:.0f}",
        f"{rss['growth_pct']:+.2f} % ({rss['slope_after_warm_mib_per_h']:+.1f} MiB/h)",
        f"<= {TARGET_RSS_GROWTH_PCT:.0f} %: {met(targets['is_rss_met'])}",
    )
    resources.add_row("  anonymous MiB", f"{rss['anon_warm_mib']:.0f}", f"{rss['anon_end_mib']:.0f}", "", "")
    resources.add_row(
        "open fds (under load)",
        f"{fds['warm']:.0f}",
        f"{fds['end']:.0f}",
        f"{fds['end'] - fds['warm']:+.0f}",
        f"no growth: {met(targets['is_fds_met'])}",
    )
    resources.add_row("  non-socket fds", f"{fds['non_socket_warm']:.0f}", f"{fds['non_socket_end']:.0f}", "", "")
    resources.add_row(
        "  fds idle, before / after load", f"{fds['idle_before']:.0f}", f"{fds['idle_after']:.0f}", "", ""
    )
    where = f"server log {report['num_server_log_problems']}, stuck requests {report['num_requests_stuck_at_idle']}"
    errors = report["num_errors"] + report["num_server_log_problems"] + report["num_requests_stuck_at_idle"]
    resources.add_row("errors", "", str(errors), where, f"0: {met(targets['is_errors_met'])}")
    return requests, resources


def plot(samples: list[dict[str, float]], wall: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(minutes, [s["rss_mib"] for s in samples], label="RSS")
    if "rss_anon_mib" in samples[0]:
        top.plot(minutes, [s["rss_anon_mib"] for s in samples], label="anonymous (heap)")
    top.set_ylabel("MiB")
    bottom.plot(minutes, [s["fds"] for s in samples], label="open fds")
    if "files" in samples[0]:
        bottom.plot(minutes, [s["files"] for s in samples], label="non-socket fds")
    bottom.set_ylabel("descriptors")
    bottom.set_xlabel("minutes")
    for ax in (top, bottom):
        ax.axvspan(WARM_WINDOW[0] * wall / 60, WARM_WINDOW[1] * wall / 60, color="C2", alpha=0.15, label="warm")
        ax.axvspan((1 - END_FRACTION) * wall / 60, wall / 60, color="C3", alpha=0.15, label="end")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    save(fig, path)
