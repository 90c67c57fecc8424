"""The serving image's Dockerfile, read statically (the real build is `container-check`, docs/deploy.md).

Invariants: Debian bookworm bases installed with `python3 -m pip`; a non-root numeric user; tini as
PID 1 so SIGTERM reaches the server and drains it; a HEALTHCHECK on /health; every `CPM2_*` it sets
is a real setting with a valid value, and docs/deploy.md states the same image defaults; the build
context holds every package pyproject.toml installs.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    out = []
    for line in lines:
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in _final_stage():
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def test_bases_are_debian_bookworm_and_pip_is_python3_m_pip() -> None:
    steps = _instructions()
    args = {m.group(1): m.group(2) for op, rest in steps if op == "ARG" and (m := re.match(r"(\w+)=(\S+)", rest))}
    for op, rest in steps:
        if op == "FROM":
            image = rest.split()[0]
            image = args.get(image.strip("${}"), image)
            assert image in {"debian:bookworm-slim", "debian:bookworm"}, image
        if op == "RUN" and "pip install" in rest:
            assert re.search(r"python3? -m pip install", rest), rest


def test_runs_as_non_root_under_tini_with_a_health_check() -> None:
    final = dict(_final_stage())
    user = final["USER"].split(":")[0]
    assert user.isdigit(), "a numeric user, so Kubernetes can check runAsNonRoot"
    assert int(user) != 0, "the image must not run as root"
    assert final["ENTRYPOINT"].startswith('["/usr/bin/tini", "--"')
    assert "/health" in final["HEALTHCHECK"]
    assert final["STOPSIGNAL"] == "SIGTERM"


def test_image_settings_are_real_and_valid() -> None:
    env = _image_env()
    cpm2 = {k.removeprefix("CPM2_").lower(): v for k, v in env.items() if k.startswith("CPM2_")}
    unknown = set(cpm2) - set(Settings.model_fields)
    assert not unknown, f"Dockerfile sets unknown settings {unknown}"
    settings = Settings(**cpm2)  # type: ignore[arg-type]
    assert settings.host == "0.0.0.0"
    assert f"EXPOSE {settings.port}" in {f"{op} {rest}" for op, rest in _final_stage()}


def test_docs_state_the_image_defaults() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    rows = dict(re.findall(r"^\| `(CPM2_\w+)` \| `([^`]*)` \|", doc, flags=re.MULTILINE))
    assert rows, "docs/deploy.md lacks its environment table"
    for name in rows:
        assert name.removeprefix("CPM2_").lower() in Settings.model_fields, f"docs/deploy.md: unknown {name}"
    for name, value in _image_env().items():
        if name.startswith("CPM2_"):
            assert rows.get(name) == value, f"docs/deploy.md says {name}={rows.get(name)!r}, the image sets {value!r}"


def test_build_context_holds_every_installed_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    copies = {rest for op, rest in _instructions() if op == "COPY"}
    for package in packages:
        assert f"!{package}/" in allowed, f".dockerignore leaves out {package}/"
        assert f"{package} {package}" in copies, f"the Dockerfile does not COPY {package}"
