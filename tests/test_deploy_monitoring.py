"""deploy/: Prometheus config and alert rules (promtool), the Grafana dashboard, the compose files, and a
real Prometheus scraping a real server. Every metric the rules and the dashboard name must be one the
server exports, so they cannot drift from server/metrics.py.

promtool and prometheus come from Debian's `prometheus` package; without them these tests skip,
unless CPM2_REQUIRE_PROMETHEUS=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port, server_process

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cpm2.json"
METRIC = re.compile(r"\bcpm2_[a-z0-9_]+")
GENERATE = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}


@pytest.fixture
def prometheus_tool() -> Callable[[str], str]:
    """Finds `promtool` or `prometheus`: skips without it, or fails where CPM2_REQUIRE_PROMETHEUS=1."""

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is not None:
            return path
        message = f"`{name}` is not installed: apt-get install prometheus (Debian/Ubuntu)"
        if os.environ.get("CPM2_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(message)
        pytest.skip(message)

    return find


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with server_process(tiny_model_dir, tmp_path_factory.mktemp("server")) as (_, url):
        yield url


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_promtool(prometheus_tool: Callable[[str], str], args: list[str]) -> None:
    done = subprocess.run([prometheus_tool("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_names_are_exported(server: str) -> None:
    assert httpx.post(f"{server}/generate", json=GENERATE, timeout=60).status_code == 200
    exported: set[str] = set()
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        exported.update(family.name + suffix for suffix in suffixes)
        exported.update(sample.name for sample in family.samples)
    for path in [PROMETHEUS / "alerts.yml", PROMETHEUS / "alerts_test.yml", DASHBOARD]:
        used = set(METRIC.findall(path.read_text()))
        assert used, path
        assert used <= exported, f"{path.name} names metrics the server does not export: {sorted(used - exported)}"


def test_dashboard_is_generated_and_consistent() -> None:
    generator = runpy.run_path(str(DEPLOY / "grafana" / "dashboard.py"))
    assert DASHBOARD.read_text() == generator["render"](), "run `python deploy/grafana/dashboard.py`"
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 39
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    for panel in panels:
        assert panel["type"] == "timeseries"
        assert panel["datasource"]["uid"] == uid
        assert panel["targets"], panel["title"]
        assert all(t["expr"] and t["datasource"]["uid"] == uid for t in panel["targets"])


def _compose(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_files() -> None:
    compose = _compose("compose.yaml")
    services = compose["services"]
    assert set(services) >= {"cpm2", "prometheus", "grafana"}
    cpm2 = services["cpm2"]
    assert cpm2["environment"]["CPM2_HOST"] == "0.0.0.0"
    assert "8080:8080" in cpm2["ports"]
    assert (DEPLOY / cpm2["build"]["context"]).resolve() == DEPLOY.parent
    assert "prometheus" in services["grafana"]["depends_on"]
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{volume}: {source} is not in the repository"
                mounts[target] = source
            else:
                assert source in compose["volumes"], f"{volume}: named volume not declared"
    assert (DEPLOY / mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    provider = _compose("grafana/provisioning/dashboards/cpm2.yml")["providers"][0]
    assert (DEPLOY / mounts[provider["options"]["path"]] / "cpm2.json").is_file()
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["job_name"] == "cpm2"
    assert scrape["static_configs"][0]["targets"] == ["cpm2:8080"]

    gpu = _compose("compose.gpu.yaml")["services"]["cpm2"]
    assert gpu["environment"] == {"CPM2_DEVICE": "cuda", "CPM2_DTYPE": "bfloat16"}
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_builds_the_root_dockerfile() -> None:
    build = _compose("compose.yaml")["services"]["cpm2"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    for files in [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]]:
        args = [arg for name in files for arg in ("-f", str(DEPLOY / name))]
        done = subprocess.run([docker, "compose", *args, "config", "-q"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def _poll(what: str, check: Callable[[], bool], deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError):  # not up yet, or not answering JSON yet
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; prometheus log:\n{log.read_text(errors='replace')[-4000:]}")


def test_prometheus_scrapes_the_server(prometheus_tool: Callable[[str], str], server: str, tmp_path: Path) -> None:
    binary = prometheus_tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "scrape_configs": [{"job_name": "cpm2", "static_configs": [{"targets": [server.removeprefix("http://")]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    api = f"http://127.0.0.1:{free_port()}/api/v1"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={api.split('/')[2]}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60

        def target_up() -> bool:
            targets = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
            return any(t["labels"]["job"] == "cpm2" and t["health"] == "up" for t in targets)

        def query(expr: str) -> list[dict[str, Any]]:
            body = httpx.get(f"{api}/query", params={"query": expr}, timeout=2).json()
            return list(body["data"]["result"])

        def rules_evaluated() -> bool:
            groups = httpx.get(f"{api}/rules", timeout=2).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert all(rule["health"] != "err" for rule in rules), rules
            return len(rules) == 6 and all(rule["health"] == "ok" for rule in rules)

        _poll("the cpm2 target to be up", target_up, deadline, log)
        assert httpx.post(f"{server}/generate", json=GENERATE, timeout=60).status_code == 200
        _poll(
            'cpm2_requests_total{code="200"}',
            lambda: any(r["metric"].get("route") == "/generate" for r in query('cpm2_requests_total{code="200"}')),
            deadline,
            log,
        )
        _poll(
            "cpm2_generation_tokens_total > 0", lambda: bool(query("cpm2_generation_tokens_total > 0")), deadline, log
        )
        _poll("the alert rules to evaluate", rules_evaluated, deadline, log)
        # Every dashboard query runs, with Grafana's variables filled in as Grafana would.
        board = json.loads(DASHBOARD.read_text())
        for target in [t for panel in board["panels"] for t in panel.get("targets", [])]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            body = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
            assert body["status"] == "success", (expr, body)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
