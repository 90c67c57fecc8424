"""Hostile uploads to `POST /prompts`: each gets its 4xx and leaves the store byte-for-byte unchanged.

Pickles (one whose `__reduce__` would create a file), torch.save archives, malformed safetensors
(truncated, lying header lengths, offsets past the end or overlapping, huge headers), values that are
or become non-finite in the serving dtype, wrong shapes and dtypes, oversize files and prompts, ids
that try to leave the store, and PEFT configs that are not prompt tuning. The store is compared by
file list and sha256 before and after, so a leftover staging directory counts as a change.
`tests/test_prompts.py` covers the parser's messages and `tests/test_peft_interop.py` real PEFT
adapters; this file is about what reaches the disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from httpx import Response
from safetensors.torch import save as save_safetensors
from server_fakes import D_MODEL, FakeEngine, local_client

from engine.serving.protocol import EngineInfo
from server.app import create_app
from server.settings import Settings

MAX_TOKENS = 32
MAX_BYTES = 4 * 2**20
CANARY = "cpm2-pickle-canary"


class _Canary:
    """Unpickling this creates `path`: the proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


class _DtypeEngine(FakeEngine):
    """The fake engine serving in another dtype (the store validates casts against it)."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype

    def info(self) -> EngineInfo:
        return dataclasses.replace(super().info(), dtype=self.dtype)


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        prompt_store=tmp_path / "prompts",
        max_virtual_tokens=MAX_TOKENS,
        max_prompt_upload_bytes=MAX_BYTES,
        allow_local_admin=True,
    )  # type: ignore[call-arg]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with local_client(create_app(_settings(tmp_path), FakeEngine())) as test_client:
        assert _upload(test_client, "keep", _good()).status_code == 201  # a store with something to break
        yield test_client


def _good(rows: int = 2) -> bytes:
    return save_safetensors({"prefix": torch.randn(rows, D_MODEL)})


def _upload(client: TestClient, prompt_id: str, data: bytes, config: bytes | None = None) -> Response:
    files = {"file": ("p.safetensors", data, "application/octet-stream")}
    if config is not None:
        files["adapter_config"] = ("adapter_config.json", config, "application/json")
    return client.post("/prompts", files=files, data={"id": prompt_id})


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) → sha256 of its bytes, or "dir"."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _assert_refused(r: Response, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == ("too_large" if status == 413 else "validation")
    assert message in body["error"], body["error"]


def _raw(header: object, body: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, data."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + body


def _entry(offsets: tuple[int, int], shape: tuple[int, ...] = (2, D_MODEL), dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _torch_save(legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save({"prefix": torch.randn(2, D_MODEL)}, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


ROW_BYTES = 2 * D_MODEL * 4  # one [2, D_MODEL] float32 tensor
BODY = bytes(ROW_BYTES)

# (case id, file bytes given the canary path, status, part of the message)
ARTIFACTS: list[tuple[str, Callable[[Path], bytes], int, str]] = [
    *[
        (f"pickle-protocol-{p}", lambda c, p=p: pickle.dumps(_Canary(c), protocol=p), 415, "safetensors")
        for p in range(6)
    ],
    ("torch-save-zip", lambda c: _torch_save(legacy=False), 415, "pickled"),
    ("torch-save-legacy", lambda c: _torch_save(legacy=True), 415, "pickled"),
    ("empty-file", lambda c: b"", 415, "too short"),
    ("truncated-data", lambda c: _good()[:-10], 415, "not a readable safetensors"),
    ("truncated-header", lambda c: _good()[:40], 415, "runs past the end"),
    ("header-length-past-end", lambda c: _raw({"prefix": _entry((0, ROW_BYTES))}, BODY, length=10_000), 415, "past"),
    ("header-claims-100MB", lambda c: _raw(b"{" + b" " * 64, length=100 * 2**20), 415, "runs past the end"),
    ("header-claims-2**64", lambda c: _raw(b"{}", length=2**64 - 1), 415, "runs past the end"),
    ("offsets-past-end", lambda c: _raw({"prefix": _entry((0, 10**6))}, BODY), 415, "offset"),
    (
        "offsets-overlap",
        lambda c: _raw({"prefix": _entry((0, ROW_BYTES)), "suffix": _entry((0, ROW_BYTES))}, BODY),
        415,
        "offset",
    ),
    (
        "shape-claims-2**40-rows",
        lambda c: _raw({"prefix": _entry((0, ROW_BYTES), (2**40, D_MODEL))}, BODY),
        415,
        "invalid shape",
    ),
    ("header-1MB-junk-json", lambda c: _raw({"junk": list(range(200_000))}, BODY), 415, "invalid JSON"),
    ("header-1MB-not-json", lambda c: _raw(b"{" + b"\x00\xff" * 2**19, BODY), 415, "not a readable"),
    ("header-json-list", lambda c: _raw([1, 2, 3]), 415, "not a JSON object"),
    (
        "metadata-not-strings",
        lambda c: _raw({"__metadata__": {"a": 1}, "prefix": _entry((0, ROW_BYTES))}, BODY),
        415,
        "expected a string",
    ),
    ("nan", lambda c: save_safetensors({"prefix": torch.full((2, D_MODEL), float("nan"))}), 422, "NaN or Inf"),
    ("-inf", lambda c: save_safetensors({"suffix": torch.full((1, D_MODEL), float("-inf"))}), 422, "NaN or Inf"),
    (
        "1e39-float64",
        lambda c: save_safetensors({"prefix": torch.full((1, D_MODEL), 1e39, dtype=torch.float64)}),
        422,
        "from float64",
    ),
    ("rank-0", lambda c: save_safetensors({"prefix": torch.tensor(1.0)}), 422, "2-D"),
    ("rank-1", lambda c: save_safetensors({"prefix": torch.randn(D_MODEL)}), 422, "2-D"),
    ("rank-3", lambda c: save_safetensors({"prefix": torch.randn(1, 2, D_MODEL)}), 422, "2-D"),
    ("width", lambda c: save_safetensors({"infix": torch.randn(2, D_MODEL - 1)}), 422, f"d_model is {D_MODEL}"),
    ("zero-rows", lambda c: save_safetensors({"prefix": torch.randn(0, D_MODEL)}), 422, "no rows"),
    ("zero-width", lambda c: save_safetensors({"prefix": torch.randn(2, 0)}), 422, f"d_model is {D_MODEL}"),
    ("no-tensors", lambda c: save_safetensors({}), 422, "no tensor"),
    ("int32", lambda c: save_safetensors({"prefix": torch.ones(2, D_MODEL, dtype=torch.int32)}), 422, "floating"),
    ("bool", lambda c: save_safetensors({"prefix": torch.ones(2, D_MODEL, dtype=torch.bool)}), 422, "floating"),
    ("tokens-one-key", lambda c: _good(MAX_TOKENS + 1), 413, f"at most {MAX_TOKENS}"),
    (
        "tokens-summed",
        lambda c: save_safetensors({"prefix": torch.randn(20, D_MODEL), "decoder_prefix": torch.randn(20, D_MODEL)}),
        413,
        "40 virtual tokens",
    ),
    ("bytes", lambda c: _good() + bytes(MAX_BYTES), 413, "CPM2_MAX_PROMPT_UPLOAD_BYTES"),
]


@pytest.mark.parametrize(("make", "status", "message"), [a[1:] for a in ARTIFACTS], ids=[a[0] for a in ARTIFACTS])
def test_hostile_file_is_refused_and_store_unchanged(
    client: TestClient, tmp_path: Path, make: Callable[[Path], bytes], status: int, message: str
) -> None:
    canary = tmp_path / CANARY
    root = tmp_path / "prompts"
    before = _snapshot(root)
    _assert_refused(_upload(client, "x", make(canary)), status, message)
    assert _snapshot(root) == before
    assert not canary.exists(), "a pickle was unpickled"


def test_the_canary_pickle_is_live(tmp_path: Path) -> None:
    # Without this, a canary that never fires would make the test above pass vacuously.
    canary = tmp_path / CANARY
    pickle.loads(pickle.dumps(_Canary(canary)))
    assert canary.exists()


BAD_IDS = ["../escape", "..", ".", "a/b", "/abs", "a\\b", "ünïcode", "ид", "a\nb", "a\tb", "a\x00b", "a\x7f", "line\n"]
BAD_IDS += [".hidden", ".tmp-x", "-dash", "_under", "a" * 129, ""]


@pytest.mark.parametrize("prompt_id", BAD_IDS, ids=[repr(i)[:20] for i in BAD_IDS])
def test_hostile_id_is_refused_and_store_unchanged(client: TestClient, tmp_path: Path, prompt_id: str) -> None:
    root = tmp_path / "prompts"
    before = _snapshot(root)
    r = _upload(client, prompt_id, _good())
    _assert_refused(r, 422, "id")
    assert _snapshot(root) == before
    assert not (tmp_path / "escape").exists()


def test_longest_id_is_accepted(client: TestClient) -> None:
    assert _upload(client, "a" * 128, _good()).status_code == 201


# An encoded "/" is decoded before routing, so "..%2Fkeep" matches no route at all (404).
PATH_IDS = [(".hidden", 422), ("a\\b", 422), ("ид", 422), ("a" * 129, 422), ("..%2Fkeep", 404), ("%00", 422)]


@pytest.mark.parametrize(("prompt_id", "status"), PATH_IDS, ids=[p[:20] for p, _ in PATH_IDS])
def test_hostile_id_in_the_path_is_refused(client: TestClient, tmp_path: Path, prompt_id: str, status: int) -> None:
    root = tmp_path / "prompts"
    before = _snapshot(root)
    for r in (client.delete(f"/prompts/{prompt_id}"), client.get(f"/prompts/{prompt_id}/file")):
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error", "error_type"}
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    ("dtype", "value", "source"),
    [("float16", 1e5, torch.float32), ("bfloat16", 1e39, torch.float64), ("float16", -7e4, torch.bfloat16)],
)
def test_overflow_in_the_serving_dtype_is_refused(
    tmp_path: Path, dtype: str, value: float, source: torch.dtype
) -> None:
    root = tmp_path / "prompts"
    with local_client(create_app(_settings(tmp_path), _DtypeEngine(dtype))) as client:
        data = save_safetensors({"prefix": torch.full((1, D_MODEL), value, dtype=source)})
        _assert_refused(_upload(client, "x", data), 422, f"NaN or Inf values in {dtype}")
        assert _snapshot(root) == {}
        assert _upload(client, "x", _good()).status_code == 201  # ordinary values still fit


def _adapter_config(**overrides: object) -> bytes:
    config = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 2}
    config |= {"num_transformer_submodules": 1, "token_dim": D_MODEL, **overrides}
    return json.dumps(config).encode()


def _adapter_weights(rows: int = 2, value: float | None = None, dtype: torch.dtype = torch.float32) -> bytes:
    t = torch.randn(rows, D_MODEL).to(dtype) if value is None else torch.full((rows, D_MODEL), value, dtype=dtype)
    return save_safetensors({"prompt_embeddings": t})


PEFT_CASES: list[tuple[str, bytes, bytes, int, str]] = [
    ("lora", _adapter_config(peft_type="LORA", r=8), _adapter_weights(), 422, "'LORA' is not supported"),
    ("prefix-tuning", _adapter_config(peft_type="PREFIX_TUNING"), _adapter_weights(), 422, "'PREFIX_TUNING'"),
    ("no-peft-type", b"{}", _adapter_weights(), 422, "peft_type None"),
    ("not-json", b"peft_type=PROMPT_TUNING", _adapter_weights(), 422, "not valid JSON"),
    ("not-utf8", b'{"peft_type": "\xff"}', _adapter_weights(), 422, "not valid JSON"),
    ("json-list", b'[{"peft_type": "PROMPT_TUNING"}]', _adapter_weights(), 422, "JSON object"),
    ("json-string", b'"PROMPT_TUNING"', _adapter_weights(), 422, "JSON object"),
    ("json-null", b"null", _adapter_weights(), 422, "JSON object"),
    ("deeply-nested", b"[" * 60_000, _adapter_weights(), 422, "nested too deeply"),
    ("huge", _adapter_config(pad="x" * 70_000), _adapter_weights(), 413, "limit"),
    ("nan-count", _adapter_config(num_virtual_tokens=float("nan")), _adapter_weights(), 422, "positive integer"),
    ("rows-vs-config", _adapter_config(num_virtual_tokens=3), _adapter_weights(), 422, "says 3 rows"),
    ("pickled-weights", _adapter_config(), pickle.dumps({"prompt_embeddings": 1}, protocol=4), 415, "adapter_model"),
    ("weights-inf-in-fp32", _adapter_config(), _adapter_weights(value=1e39, dtype=torch.float64), 422, "NaN or Inf"),
    ("weights-int", _adapter_config(), _adapter_weights(dtype=torch.int64), 422, "floating point"),
    (
        "weights-too-many-tokens",
        _adapter_config(num_virtual_tokens=MAX_TOKENS + 1),
        _adapter_weights(MAX_TOKENS + 1),
        413,
        f"at most {MAX_TOKENS}",
    ),
]


@pytest.mark.parametrize(
    ("config", "weights", "status", "message"), [c[1:] for c in PEFT_CASES], ids=[c[0] for c in PEFT_CASES]
)
def test_hostile_adapter_is_refused_and_store_unchanged(
    client: TestClient, tmp_path: Path, config: bytes, weights: bytes, status: int, message: str
) -> None:
    root = tmp_path / "prompts"
    before = _snapshot(root)
    _assert_refused(_upload(client, "x", weights, config), status, message)
    assert _snapshot(root) == before
    assert _upload(client, "x", _adapter_weights(), _adapter_config()).status_code == 201  # the control
