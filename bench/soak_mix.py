"""The soak test's request mix: what each closed-loop client sends, and what counts as an error.

A client picks an operation at random (weights in `WEIGHTS`, seeded per client), runs it and
records one `Outcome` per HTTP request. An outcome is an error when the status is not the one
expected, a stream breaks (no final event, an error event, bad JSON) or the body lacks what the API
promises. Invalid requests are part of the mix on purpose: refused with the expected 4xx they are
counted as `is_refusal`, not as errors, since refusing them is the server doing its job.

Soft prompts: a few shared prompts (prefix, infix, suffix, all four kinds) live for the whole run;
`prompt_churn` has each client upload a prompt of its own, use it, delete it and check that it is
gone (404), so ids never race between clients.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from bench.serve_load import INPUTS
from engine.prompts import SoftPrompt

#: Relative frequency of each operation.
WEIGHTS: dict[str, int] = {
    "generate_greedy": 16,
    "generate_sampled": 12,
    "stream": 10,
    "stream_disconnect": 8,
    "completions": 10,
    "tokenize": 8,
    "prompt_generate": 14,
    "prompt_churn": 6,
    "invalid": 12,
}
NEW_TOKENS = (1, 2, 8, 16, 32, 64)
SHARED_PROMPTS = ("soak-prefix", "soak-infix", "soak-suffix", "soak-all")


@dataclass
class Outcome:
    """One HTTP request of the soak."""

    kind: str
    started: float  # monotonic seconds
    seconds: float
    error: str | None = None
    is_refusal: bool = False  # an invalid request answered with its expected 4xx (or 504)


def make_prompt(kind: str, d_model: int, rng: random.Random) -> bytes:
    """A random soft prompt with the tensors `kind` names (`all`: every position)."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    rows = {"prefix": rng.randint(4, 24), "infix": rng.randint(2, 8), "suffix": rng.randint(2, 8)}
    keys = ("prefix", "infix", "suffix", "decoder_prefix") if kind == "all" else (kind,)
    tensors = {k: torch.randn(rows.get(k, 3), d_model, generator=generator) * 0.5 for k in keys}
    return SoftPrompt(
        prefix=tensors.get("prefix"),
        infix=tensors.get("infix"),
        suffix=tensors.get("suffix"),
        decoder_prefix=tensors.get("decoder_prefix"),
    ).to_bytes()


def upload_shared_prompts(url: str, d_model: int) -> None:
    """The prompts every client uses for the whole run."""
    rng = random.Random(0)
    for prompt_id in SHARED_PROMPTS:
        data = make_prompt(prompt_id.removeprefix("soak-"), d_model, rng)
        r = httpx.post(f"{url}/prompts", files={"file": ("p.safetensors", data)}, data={"id": prompt_id}, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"upload of {prompt_id} failed: {r.status_code} {r.text}")


def _has(key: str) -> Callable[[httpx.Response], str | None]:
    def check(response: httpx.Response) -> str | None:
        return None if key in response.json() else f"the answer has no `{key}`: {response.text[:200]}"

    return check


async def read_events(
    response: httpx.Response, where: str, *, is_openai: bool, stop_after: int | None = None
) -> str | None:
    """Read a server-sent event stream to its end, or hang up after `stop_after` events (leaving the
    caller's `stream` block then closes the connection: the server must cancel). Returns the error:
    an error event, or a stream that ended without its final event (TGI: `details`; OpenAI: `[DONE]`)."""
    num_events, is_finished = 0, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # keep-alive comments and blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            is_finished = is_openai
            continue
        event = json.loads(payload)
        if "error" in event:
            return f"{where}: error event {payload[:200]}"
        num_events += 1
        is_finished = is_finished or (not is_openai and event.get("details") is not None)
        if stop_after is not None and num_events >= stop_after:
            return None
    return None if is_finished else f"{where}: the stream ended after {num_events} events without its final event"


class SoakClient:
    """One closed-loop client: `step()` runs one randomly chosen operation."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        index: int,
        model_name: str,
        d_model: int,
        outcomes: list[Outcome],
        seed: int = 0,
    ) -> None:
        self.client = client
        self.index = index
        self.model_name = model_name
        self.d_model = d_model
        self.outcomes = outcomes
        self.rng = random.Random(seed * 1000 + index)
        self.num_uploads = 0
        self.ops: dict[str, Callable[[], Awaitable[None]]] = {name: getattr(self, name) for name in WEIGHTS}

    async def step(self, kind: str | None = None) -> None:
        """Run `kind`, or an operation drawn by `WEIGHTS`."""
        if kind is None:
            kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        await self.ops[kind]()

    # ---- plumbing ------------------------------------------------------------------------------

    def _record(self, kind: str, started: float, error: str | None = None, *, is_refusal: bool = False) -> None:
        self.outcomes.append(Outcome(kind, started, time.monotonic() - started, error, is_refusal and error is None))

    async def _request(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        expected: int = 200,
        check: Callable[[httpx.Response], str | None] | None = None,
        **kwargs: Any,
    ) -> None:
        started = time.monotonic()
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self._record(kind, started, f"{method} {path}: {type(exc).__name__} {exc}")
            return
        if response.status_code != expected:
            message = f"{method} {path}: {response.status_code}, expected {expected}: {response.text[:200]}"
            self._record(kind, started, message)
            return
        try:
            problem = check(response) if check is not None else None
        except (ValueError, KeyError, TypeError) as exc:  # a body that is not the promised JSON
            problem = f"{method} {path}: unreadable answer ({exc}): {response.text[:200]}"
        self._record(kind, started, problem, is_refusal=expected >= 400)

    async def _stream(self, kind: str, path: str, body: dict[str, Any], *, stop_after: int | None = None) -> None:
        """Read a server-sent event stream to its end, or hang up after `stop_after` events."""
        started = time.monotonic()
        is_openai = path.startswith("/v1/")
        error = None
        try:
            async with self.client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    error = f"POST {path}: {response.status_code}: {(await response.aread())[:200]!r}"
                else:
                    error = await read_events(response, f"POST {path}", is_openai=is_openai, stop_after=stop_after)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            error = f"POST {path}: {type(exc).__name__} {exc}"
        self._record(kind, started, error)

    def _text(self) -> str:
        return self.rng.choice(INPUTS)

    def _tgi_body(self, *, sampled: bool, prompt_id: str | None = None) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_new_tokens": self.rng.choice(NEW_TOKENS)}
        if sampled:
            parameters |= {"do_sample": True, "temperature": self.rng.choice((0.7, 1.0, 1.3))}
            parameters["seed"] = self.rng.randrange(2**31)
            parameters |= self.rng.choice(({"top_k": 20}, {"top_p": 0.9}, {"repetition_penalty": 1.2}, {}))
        else:
            parameters["ignore_eos"] = self.rng.random() < 0.5
        if self.rng.random() < 0.2:
            parameters["stop"] = ["。"]
        if self.rng.random() < 0.3:
            parameters["details"] = True
        if prompt_id is not None:
            parameters["prompt_id"] = prompt_id
            if self.rng.random() < 0.5:
                parameters["text_pair"] = self._text()  # the infix goes between the two segments
        return {"inputs": self._text(), "parameters": parameters}

    # ---- operations ------------------------------------------------------------------------------

    async def generate_greedy(self) -> None:
        body = self._tgi_body(sampled=False)
        await self._request("generate", "POST", "/generate", json=body, check=_has("generated_text"))

    async def generate_sampled(self) -> None:
        body = self._tgi_body(sampled=True)
        await self._request("generate", "POST", "/generate", json=body, check=_has("generated_text"))

    async def stream(self) -> None:
        await self._stream("stream", "/generate_stream", self._tgi_body(sampled=self.rng.random() < 0.5))

    async def stream_disconnect(self) -> None:
        body = {"inputs": self._text(), "parameters": {"max_new_tokens": 64, "ignore_eos": True}}
        await self._stream("stream_disconnect", "/generate_stream", body, stop_after=self.rng.randint(1, 4))

    async def completions(self, model: str | None = None) -> None:
        if model is None:
            model = self.model_name if self.rng.random() < 0.7 else self.rng.choice(SHARED_PROMPTS)
        body: dict[str, Any] = {"model": model, "prompt": self._text(), "max_tokens": self.rng.choice(NEW_TOKENS)}
        if self.rng.random() < 0.5:
            body |= {"temperature": 0.8, "seed": self.rng.randrange(2**31)}
        if self.rng.random() < 0.3:
            await self._stream("completions", "/v1/completions", {**body, "stream": True})
        else:
            await self._request("completions", "POST", "/v1/completions", json=body, check=_has("choices"))

    async def tokenize(self) -> None:
        body: dict[str, Any] = {"inputs": self._text()}
        if self.rng.random() < 0.5:
            body |= {"text_pair": self._text(), "prompt_id": self.rng.choice(SHARED_PROMPTS)}
        await self._request("tokenize", "POST", "/tokenize", json=body, check=_has("tokens"))

    async def prompt_generate(self, prompt_id: str | None = None) -> None:
        prompt_id = prompt_id or self.rng.choice(SHARED_PROMPTS)
        if self.rng.random() < 0.3:
            body = self._tgi_body(sampled=self.rng.random() < 0.5, prompt_id=prompt_id)
            await self._stream("prompt_generate", "/generate_stream", body)
            return
        body = self._tgi_body(sampled=self.rng.random() < 0.5, prompt_id=prompt_id)
        await self._request("prompt_generate", "POST", "/generate", json=body, check=_has("generated_text"))

    async def prompt_churn(self) -> None:
        """Upload a prompt of this client's own, use it, delete it, and check that it is gone."""
        self.num_uploads += 1
        prompt_id = f"soak-c{self.index}-{self.num_uploads}"
        data = make_prompt(self.rng.choice(("prefix", "infix", "suffix", "all")), self.d_model, self.rng)
        files = {"file": ("p.safetensors", data)}
        await self._request("prompt_upload", "POST", "/prompts", expected=201, files=files, data={"id": prompt_id})
        for _ in range(self.rng.randint(1, 3)):
            await self.prompt_generate(prompt_id)
        await self._request("prompt_delete", "DELETE", f"/prompts/{prompt_id}", expected=204)
        body = {"inputs": self._text(), "parameters": {"prompt_id": prompt_id, "max_new_tokens": 2}}
        await self._request("prompt_after_delete", "POST", "/generate", expected=404, json=body)

    async def invalid(self) -> None:
        """One request the server must refuse, with the status it must refuse it with."""
        text = self._text()

        def tgi(**parameters: Any) -> dict[str, Any]:
            return {"json": {"inputs": text, "parameters": parameters}}

        def raw(content: bytes) -> dict[str, Any]:
            return {"content": content, "headers": {"content-type": "application/json"}}

        def upload(data: bytes, prompt_id: str) -> dict[str, Any]:
            return {"files": {"file": ("p.safetensors", data)}, "data": {"id": prompt_id}}

        cases: list[tuple[str, str, int, dict[str, Any]]] = [
            ("POST", "/generate", 422, {"json": {"inputs": ""}}),
            ("POST", "/generate", 422, tgi(max_new_tokens=0)),
            ("POST", "/generate", 422, tgi(max_new_tokens=10**6)),
            ("POST", "/generate", 422, tgi(top_p=1.5)),
            ("POST", "/generate", 422, tgi(best_of=2)),
            ("POST", "/generate", 422, tgi(stop=list("abcdef"))),
            ("POST", "/generate", 422, raw(b"{not json")),
            ("POST", "/generate", 404, tgi(prompt_id="soak-missing")),
            ("POST", "/generate", 422, tgi(prompt_id="../etc")),
            # A deadline no 64-token generation can meet: the timeout path.
            ("POST", "/generate", 504, tgi(max_new_tokens=64, ignore_eos=True, timeout_ms=1)),
            # Over CPM2_PAYLOAD_LIMIT (2 MB by default): refused from its Content-Length.
            ("POST", "/generate", 413, raw(b" " * 2_100_000)),
            ("POST", "/generate_stream", 404, tgi(prompt_id="soak-gone")),
            ("POST", "/v1/completions", 404, {"json": {"model": "no-such-model", "prompt": text}}),
            ("POST", "/v1/completions", 422, {"json": {"model": self.model_name, "prompt": text, "n": 2}}),
            ("POST", "/tokenize", 422, {"json": {}}),
            ("POST", "/prompts", 415, {"files": {"file": ("p.bin", b"\x80\x04\x95pickle")}, "data": {"id": "soak-x"}}),
            ("POST", "/prompts", 422, upload(make_prompt("prefix", self.d_model + 1, self.rng), "soak-w")),
            ("POST", "/prompts", 409, upload(make_prompt("prefix", self.d_model, self.rng), SHARED_PROMPTS[0])),
            ("DELETE", "/prompts/soak-missing", 404, {}),
            ("GET", "/no-such-route", 404, {}),
        ]
        method, path, expected, kwargs = self.rng.choice(cases)
        await self._request("invalid", method, path, expected=expected, **kwargs)
