"""The memory plan is what loading does: `cpm2 info`'s plan equals `load_for_inference`'s on a real model.

Invariants: for every budget and dtype, the plan `describe_model` makes (no weights read) is the plan
`load_for_inference` follows, and the pool has exactly its slots; a budget too small is a plan (with
its minimum) for `info` and the same error for loading; staging buffers shorten the window before a
budget is refused; a plan for a GPU this machine lacks needs an explicit budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError
from engine.experts.blob import BlobLayout
from engine.memory_plan import MIN_SLOTS, MachineMemory, MemoryPlan, plan_memory
from engine.model_info import describe_model
from engine.offload import OffloadConfig, load_for_inference
from engine.sizes import format_bytes
from engine.summary import summarize
from engine.weights.presets import get_preset

TINY = get_preset("tiny").config
MACHINE = MachineMemory(auto_budget_bytes=10**9, host_ram_bytes=10**12)


def _plan(expert_memory: str | int | None, *, dtype: torch.dtype, device: str = "cpu", window: int = 4) -> MemoryPlan:
    return plan_memory(
        TINY,
        dtype=dtype,
        device=torch.device(device),
        expert_memory=expert_memory,
        window=window,
        host_tier="auto",
        store_dtype=torch.float32,
        machine=MACHINE,
    )


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("budget", ["40%", "75%", "100%", "300KiB"])
def test_info_plans_what_loading_does(tiny_model_dir: Path, tmp_path: Path, budget: str, dtype: str | None) -> None:
    offload = OffloadConfig(expert_memory=budget, store_dir=tmp_path / "store")
    described = describe_model(tiny_model_dir, dtype=dtype, device="cpu", offload=offload)
    loaded = load_for_inference(tiny_model_dir, dtype=dtype, offload=offload, progress=False)
    try:
        assert loaded.plan == described.plan
        assert loaded.is_offloaded == described.plan.is_offloaded == (budget != "100%")
        if loaded.provider is not None:
            assert loaded.provider.pool.num_slots == described.plan.num_slots >= MIN_SLOTS
            assert loaded.provider.transfers.window == described.plan.window  # type: ignore[attr-defined]
        assert loaded.budget_bytes == described.plan.budget_bytes
    finally:
        loaded.close()


def test_a_budget_too_small_is_a_plan_for_info_and_an_error_for_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    offload = OffloadConfig(expert_memory="100KiB", store_dir=tmp_path / "store")
    plan = describe_model(tiny_model_dir, dtype="bf16", device="cpu", offload=offload).plan
    assert plan.is_too_small
    # bf16 compute from a float32 store: two bf16 experts plus one float32 staging blob.
    per_expert = summarize(TINY, torch.bfloat16).bytes_per_expert
    assert plan.min_budget_bytes == MIN_SLOTS * per_expert + BlobLayout.of(TINY, torch.float32).nbytes
    with pytest.raises(ConfigError) as loading:
        load_for_inference(tiny_model_dir, dtype="bf16", offload=offload, progress=False)
    with pytest.raises(ConfigError) as planning:
        plan.check()
    assert str(loading.value) == str(planning.value)
    assert f"at least {format_bytes(plan.min_budget_bytes)}" in str(loading.value)

    # One byte short of the minimum is refused, the minimum itself is taken (with one load in flight).
    assert _plan(plan.min_budget_bytes - 1, dtype=torch.bfloat16).is_too_small
    smallest = _plan(plan.min_budget_bytes, dtype=torch.bfloat16)
    assert (smallest.is_too_small, smallest.num_slots, smallest.window) == (False, MIN_SLOTS, 1)


def test_staging_shortens_the_window_before_refusing() -> None:
    per_expert = summarize(TINY, torch.bfloat16).bytes_per_expert
    blob = BlobLayout.of(TINY, torch.float32).nbytes
    # Room for two experts and two staging buffers, not for four buffers: the window drops to 2.
    plan = _plan(MIN_SLOTS * per_expert + 2 * blob, dtype=torch.bfloat16)
    assert (plan.num_slots, plan.window, plan.staging_bytes) == (MIN_SLOTS, 2, 2 * blob)
    assert plan.resident_bytes == plan.dense_bytes + plan.pool_bytes + plan.staging_bytes
    # In the store's own dtype, or on a GPU, nothing is staged and the whole budget is slots.
    budget = 10 * per_expert
    for same in (_plan(budget, dtype=torch.float32), _plan(budget, dtype=torch.bfloat16, device="cuda")):
        assert same.staging_bytes == 0
        assert same.window == 4
        assert same.num_slots == budget // same.bytes_per_expert


def test_host_tier_and_store_size() -> None:
    plan = _plan("50%", dtype=torch.bfloat16, device="cuda")
    assert plan.host_tier == "pinned"  # 1 TB of RAM holds every expert
    assert plan.store_bytes == 16 * BlobLayout.of(TINY, torch.float32).nbytes
    small_ram = plan_memory(
        TINY,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),
        expert_memory="50%",
        window=4,
        host_tier="auto",
        store_dtype=torch.float32,
        machine=MachineMemory(auto_budget_bytes=None, host_ram_bytes=1000),
    )
    assert small_ram.host_tier == "disk"
    assert _plan("50%", dtype=torch.bfloat16).host_tier == "disk"  # a CPU maps the store


def test_an_automatic_budget_needs_a_measurement() -> None:
    unmeasured = MachineMemory(auto_budget_bytes=None, host_ram_bytes=10**12)
    kwargs = {
        "dtype": torch.float32,
        "device": torch.device("cuda"),
        "window": 4,
        "host_tier": "auto",
        "store_dtype": torch.float32,
        "machine": unmeasured,
    }
    with pytest.raises(ConfigError, match=r"--expert-memory SIZE"):
        plan_memory(TINY, expert_memory=None, **kwargs)  # type: ignore[arg-type]
    assert plan_memory(TINY, expert_memory="1MiB", **kwargs).budget_bytes == 2**20  # type: ignore[arg-type]
    # A dense model has nothing to offload and reads no budget at all.
    dense = get_preset("demo-dense").config
    assert plan_memory(dense, expert_memory="lots", **kwargs).is_offloaded is False  # type: ignore[arg-type]
