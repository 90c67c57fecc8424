"""Tensor work of a serving process outside the engine thread runs in threads that end with it, so
their OpenMP teams do not outlive it (engine/serving/threads.py says what a live one costs)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

import engine.model.kernels as kernels_module
import engine.serving.engine as engine_module
import server.prompt_store as prompt_store_module
from engine.experts.cpu import cast_serially
from engine.prompts import SoftPrompt
from engine.serving.engine import AsyncEngine, EngineConfig
from engine.serving.threads import in_fresh_thread
from server.prompt_store import PromptStore


def test_returns_the_result_and_raises_the_error() -> None:
    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return 42

    assert in_fresh_thread(work) == 42
    assert ran_on[0] is not threading.current_thread()
    assert not ran_on[0].is_alive()

    error = ValueError("bad input")

    def fail() -> None:
        raise error

    with pytest.raises(ValueError, match="bad input") as raised:
        in_fresh_thread(fail)
    assert raised.value is error


def _num_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _libgomp_loaded() -> bool:
    maps = Path("/proc/self/maps")
    return maps.is_file() and "libgomp" in maps.read_text()


@pytest.mark.skipif(not _libgomp_loaded(), reason="libgomp's teams, seen through Linux's /proc (other OpenMPs pool)")
def test_a_parallel_op_leaves_no_worker_threads_behind() -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: torch starts no worker threads")
    counts: dict[str, int] = {}
    suite_threads = torch.get_num_threads()  # the suite runs one (conftest); a server runs a team

    def work() -> None:
        counts["before"] = _num_threads()  # this thread included
        torch.set_num_threads(2)
        try:
            # Big enough to run in parallel; the worker threads exist while this thread lives.
            torch.ones(4_000_000).mul_(2).sum()
            counts["during"] = _num_threads()
        finally:
            torch.set_num_threads(suite_threads)

    in_fresh_thread(work)
    assert counts["during"] > counts["before"]  # the op did start a team, which this test is about
    deadline = time.monotonic() + 5
    while _num_threads() >= counts["before"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the workers exit as the thread that led them does
    assert _num_threads() < counts["before"]  # the team and the thread that ran the op are gone


def test_the_engine_loads_its_model_off_the_calling_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loaded_on: list[threading.Thread] = []

    class LoadRefusedError(RuntimeError):
        pass

    def load(*args: object, **kwargs: object) -> None:
        loaded_on.append(threading.current_thread())
        raise LoadRefusedError("the model directory is unreadable")

    monkeypatch.setattr(engine_module, "load_for_inference", load)
    with pytest.raises(LoadRefusedError, match="unreadable"):  # the loader's error reaches the caller as it was
        AsyncEngine.from_config(EngineConfig(model=tmp_path))
    assert loaded_on[0] is not threading.current_thread()
    assert not loaded_on[0].is_alive()


@pytest.mark.skipif(not _libgomp_loaded(), reason="libgomp's teams, seen through Linux's /proc (other OpenMPs pool)")
def test_the_engine_answers_the_event_loop_without_a_thread_team(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    """What the server asks the engine on its event loop's thread runs no parallel tensor work: the
    int4 probe behind `info` once did, and the event loop's team throttled the engine's (a batch-1
    decode step of the serving benchmark's model in the server: 7.8 ms against 4.1 in-process)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: torch starts no worker threads")
    # A kernel table with nothing probed yet, as in a fresh server process.
    monkeypatch.setattr(kernels_module, "_active", kernels_module.CpuKernels(kernels_module.active_kernels().mode))
    engine = AsyncEngine.from_config(EngineConfig(model=tiny_model_dir))
    counts: dict[str, int] = {}
    suite_threads = torch.get_num_threads()

    def work() -> dict[str, str]:
        counts["before"] = _num_threads()
        torch.set_num_threads(2)  # as a server's process runs
        try:
            info = engine.info()
            engine.stats()
            engine.health()
            engine.tokenize("hello world")
            counts["during"] = _num_threads()
            return info.cpu_kernels
        finally:
            torch.set_num_threads(suite_threads)

    try:
        cpu_kernels = in_fresh_thread(work)
    finally:
        engine.loaded.close()
    assert "int4_packing" in cpu_kernels  # the probe ran, in the loader's thread
    assert counts["during"] == counts["before"]


def test_the_prompt_store_checks_prompts_off_the_calling_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    checked_on: list[threading.Thread] = []
    parse = prompt_store_module.parse_soft_prompt

    def recording_parse(*args: object, **kwargs: object) -> SoftPrompt:
        checked_on.append(threading.current_thread())
        return parse(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prompt_store_module, "parse_soft_prompt", recording_parse)
    store = PromptStore(
        tmp_path, d_model=8, dtype=torch.float32, max_virtual_tokens=16, max_upload_bytes=2**20, cache_bytes=2**20
    )
    prompt = SoftPrompt(prefix=torch.randn(3, 8))
    store.create("p", prompt.to_bytes())
    torch.testing.assert_close(store.load("p").prefix, prompt.prefix)
    torch.testing.assert_close(store.stored_prompt("p").prefix, prompt.prefix)
    assert len(checked_on) == 3  # upload, first load (a cache miss), export
    assert all(t is not threading.current_thread() and not t.is_alive() for t in checked_on)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_an_io_thread_converts_experts_without_a_thread_team() -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: torch starts no worker threads")
    source = torch.randn(1024, 1000, dtype=torch.bfloat16)
    counts: dict[str, int] = {}
    suite_threads = torch.get_num_threads()

    def work() -> torch.Tensor:
        counts["before"] = _num_threads()
        torch.set_num_threads(2)  # as a server's process runs
        try:
            converted = cast_serially(source, torch.float32)
            counts["during"] = _num_threads()
            return converted
        finally:
            torch.set_num_threads(suite_threads)

    converted = in_fresh_thread(work)
    assert torch.equal(converted, source.float())
    assert counts["during"] == counts["before"]
