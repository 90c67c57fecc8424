"""Durable soft-prompt store shared by every replica that mounts the same directory.

Layout: `<root>/<id>/prompt.safetensors` and `<root>/<id>/meta.json`. An upload is written into a
private temporary directory (files fsynced), which is then renamed to `<root>/<id>` in one atomic
step: a crash leaves either nothing or a complete prompt, and two replicas uploading the same id
race safely (one rename wins, the other gets 409). A delete renames the directory aside first, so
readers never see half a prompt. Replicas keep a byte-bounded in-memory LRU cache and re-check the
directory on every lookup (one `stat`), so an upload or delete on any replica is seen by all.
A request holds its prompt's tensors, so deleting a prompt never breaks a request already running.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.errors import Cpm2Error, InputError
from engine.prompts import SoftPrompt, parse_soft_prompt
from engine.serving.threads import in_fresh_thread

PROMPT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENSOR_FILE = "prompt.safetensors"
META_FILE = "meta.json"
#: A staging directory this old belongs to a crashed upload (an upload writes at most
#: CPM2_MAX_PROMPT_UPLOAD_BYTES, seconds of work); a younger one may be another replica's.
STALE_STAGING_SECONDS = 3600.0


class PromptNotFoundError(Cpm2Error):
    """No prompt with that id (HTTP 404)."""


class PromptExistsError(Cpm2Error):
    """A prompt with that id already exists (HTTP 409)."""


@dataclass(frozen=True)
class PromptRecord:
    """What the store knows about one prompt (the JSON of `GET /prompts/{id}`)."""

    id: str
    description: str
    sha256: str
    size_bytes: int
    num_virtual_tokens: dict[str, int]
    d_model: int
    dtype: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StoreCounters:
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    load_seconds_total: float = 0.0
    loads: int = 0
    load_failures: int = 0


def check_id(prompt_id: str) -> str:
    """`prompt_id` if it is a valid id (letters, digits, `.`, `_`, `-`; 1-128; no leading symbol)."""
    if not PROMPT_ID.fullmatch(prompt_id):
        raise InputError(
            f"invalid prompt id {prompt_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return prompt_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PromptStore:
    """The prompts of one model, validated against its width and serving dtype."""

    def __init__(
        self,
        root: Path,
        *,
        d_model: int,
        dtype: torch.dtype,
        max_virtual_tokens: int,
        max_upload_bytes: int,
        cache_bytes: int,
    ) -> None:
        self.root = root
        self.d_model = d_model
        self.dtype = dtype
        self.max_virtual_tokens = max_virtual_tokens
        self.max_upload_bytes = max_upload_bytes
        self.cache_bytes = cache_bytes
        self.counters = StoreCounters()
        self._cache: OrderedDict[str, tuple[str, SoftPrompt]] = OrderedDict()  # id -> (sha256, prompt)
        self._cached_bytes = 0
        self._bundled: dict[str, tuple[PromptRecord, bytes]] = {}  # id -> (record, file bytes)
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Remove what crashed uploads and deletes left behind (never a complete prompt).

        A `.deleted-` directory is unreachable once renamed aside, so it always goes. A `.tmp-` one
        may be an upload in progress on another replica sharing the directory: removing it then
        would fail that upload, or let it rename a half-emptied directory into place. Only staging
        directories older than any upload could take are removed; the store ignores the rest.
        """
        now = time.time()
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                try:
                    if now - entry.stat().st_mtime < STALE_STAGING_SECONDS:
                        continue
                except FileNotFoundError:  # renamed into place or removed meanwhile
                    continue
            elif not entry.name.startswith(".deleted-"):
                continue
            shutil.rmtree(entry, ignore_errors=True)

    def _dir(self, prompt_id: str) -> Path:
        path = self.root / check_id(prompt_id)
        # The id regex already rules out separators; this guards against anything it might miss.
        if path.resolve().parent != self.root.resolve():
            raise InputError(f"invalid prompt id {prompt_id!r}")
        return path

    # ---- writes ------------------------------------------------------------------------------

    def create(self, prompt_id: str, data: bytes, *, description: str = "") -> PromptRecord:
        """Validate and store a new prompt; raises PromptExistsError if the id is taken."""
        target = self._dir(prompt_id)
        if prompt_id in self._bundled:
            raise PromptExistsError(f"prompt {prompt_id!r} is bundled with the model (read-only); use another id")
        if target.exists():
            raise PromptExistsError(f"prompt {prompt_id!r} already exists; delete it first or use another id")
        record, _ = self._validate(prompt_id, data, description=description, created_at=time.time())
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name, payload in ((TENSOR_FILE, data), (META_FILE, json.dumps(record.to_dict()).encode())):
                with open(staging / name, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(staging)
            try:
                os.rename(staging, target)
            except OSError as exc:  # another upload of the same id won the race
                raise PromptExistsError(f"prompt {prompt_id!r} already exists") from exc
            _fsync_dir(self.root)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return record

    def add_bundle(self, directory: Path) -> list[str]:
        """Serve every ``<id>.safetensors`` of `directory` (a model's bundled prompts) read-only,
        beside the uploads; returns their ids. Nothing is written: a bundle works on a read-only
        filesystem, and every replica of the model has the same one. Each file is validated as an
        upload is; a bad one raises InputError naming it (a model is not served without a prompt
        it ships). Bundled ids cannot be uploaded over or deleted (409).
        """
        for path in sorted(directory.glob("*.safetensors")):
            prompt_id = check_id(path.name.removesuffix(".safetensors"))
            try:
                data = path.read_bytes()
                record, prompt = self._validate(prompt_id, data, description="", created_at=path.stat().st_mtime)
            except (InputError, OSError) as err:
                raise InputError(f"bundled prompt {path} cannot be loaded: {err}") from err
            described = prompt.metadata.get("description", f"bundled with the model ({path})")
            self._bundled[prompt_id] = (replace(record, description=described[:1000]), data)
        return sorted(self._bundled)

    def _parse(self, data: bytes, dtype: torch.dtype, *, max_bytes: int | None = None) -> SoftPrompt:
        """`parse_soft_prompt` against this model, in a thread that ends with it: its cast and NaN
        scan run in parallel on large prompts, and a request worker that kept that thread team alive
        would slow every decode step (`engine.serving.threads`)."""
        return in_fresh_thread(
            lambda: parse_soft_prompt(
                data, d_model=self.d_model, dtype=dtype, max_virtual_tokens=self.max_virtual_tokens, max_bytes=max_bytes
            ),
            name="cpm2-prompt-check",
        )

    def _validate(
        self, prompt_id: str, data: bytes, *, description: str, created_at: float
    ) -> tuple[PromptRecord, SoftPrompt]:
        """Parse `data` against the model (width, serving dtype, virtual tokens, upload size) and
        describe it; raises InputError (or a subclass) for anything the server would refuse."""
        prompt = self._parse(data, self.dtype, max_bytes=self.max_upload_bytes)
        record = PromptRecord(
            id=prompt_id,
            description=description[:1000],
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            num_virtual_tokens=prompt.num_virtual_tokens,
            d_model=self.d_model,
            dtype=str(self.dtype).removeprefix("torch."),
            created_at=created_at,
        )
        return record, prompt

    def delete(self, prompt_id: str) -> None:
        """Remove a prompt; requests already using it finish with their own copy."""
        source = self._dir(prompt_id)
        if prompt_id in self._bundled and not source.exists():
            raise PromptExistsError(f"prompt {prompt_id!r} is bundled with the model (read-only) and cannot be deleted")
        aside = self.root / f".deleted-{prompt_id}-{uuid.uuid4().hex}"
        try:
            os.rename(source, aside)
        except FileNotFoundError:
            raise PromptNotFoundError(f"no prompt {prompt_id!r}") from None
        _fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)
        with self._lock:
            self._drop(prompt_id)

    # ---- reads -------------------------------------------------------------------------------

    def record(self, prompt_id: str) -> PromptRecord:
        meta = self._dir(prompt_id) / META_FILE
        try:
            data = json.loads(meta.read_text())
        except FileNotFoundError:
            if prompt_id in self._bundled:
                return self._bundled[prompt_id][0]
            raise PromptNotFoundError(f"no prompt {prompt_id!r}") from None
        return PromptRecord(**data)

    def records(self) -> list[PromptRecord]:
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / META_FILE).exists():
                continue
            try:
                found.append(self.record(entry.name))
            except (PromptNotFoundError, InputError, json.JSONDecodeError, TypeError):
                continue  # deleted meanwhile, or not a prompt directory
        uploaded = {record.id for record in found}
        # A store that predates the bundle may hold an id it now has: the upload is what is served.
        return found + [
            record for bundled_id, (record, _) in sorted(self._bundled.items()) if bundled_id not in uploaded
        ]

    def file_bytes(self, prompt_id: str) -> bytes:
        try:
            return (self._dir(prompt_id) / TENSOR_FILE).read_bytes()
        except FileNotFoundError:
            if prompt_id in self._bundled:
                return self._bundled[prompt_id][1]
            raise PromptNotFoundError(f"no prompt {prompt_id!r}") from None

    def stored_prompt(self, prompt_id: str) -> SoftPrompt:
        """The prompt's tensors in float32 rather than the serving dtype (for export; not cached)."""
        return self._parse(self.file_bytes(prompt_id), torch.float32)

    def load(self, prompt_id: str) -> SoftPrompt:
        """The prompt's tensors (cached; re-validated against the directory on every call)."""
        record = self.record(prompt_id)  # raises PromptNotFoundError after a delete on any replica
        with self._lock:
            cached = self._cache.get(prompt_id)
            if cached is not None and cached[0] == record.sha256:
                self._cache.move_to_end(prompt_id)
                self.counters.cache_hits += 1
                return cached[1]
            self.counters.cache_misses += 1
        begin = time.perf_counter()
        try:
            prompt = self._parse(self.file_bytes(prompt_id), self.dtype)
        except Exception:
            self.counters.load_failures += 1
            raise
        self.counters.loads += 1
        self.counters.load_seconds_total += time.perf_counter() - begin
        with self._lock:
            self._drop(prompt_id)
            if prompt.nbytes <= self.cache_bytes:
                self._cache[prompt_id] = (record.sha256, prompt)
                self._cached_bytes += prompt.nbytes
                while self._cached_bytes > self.cache_bytes:
                    _, (_, old) = self._cache.popitem(last=False)
                    self._cached_bytes -= old.nbytes
                    self.counters.cache_evictions += 1
        return prompt

    def _drop(self, prompt_id: str) -> None:
        cached = self._cache.pop(prompt_id, None)
        if cached is not None:
            self._cached_bytes -= cached[1].nbytes

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    @property
    def num_cached(self) -> int:
        return len(self._cache)
