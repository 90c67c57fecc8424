"""Request body limits that hold for every body: counted while it is read, refused once crossed.

A `Content-Length` header is only a claim, and a chunked body has none, so the limit is enforced on
the bytes themselves: this ASGI middleware counts every chunk the application receives and, at the
first byte over the limit, stops the read and answers 413 in the route's error shape. Whatever the
application does with the interrupted read (FastAPI turns a failed body read into a 400) is
replaced by that 413. A declared length over the limit is refused before anything is read.

The refusal is sent at once, and then, as nginx does (`lingering_close`), the rest of the body is
read and discarded for a bounded time and byte count before the connection closes: a client that
writes its whole body before reading (requests, httpx, most SDKs) then reads the 413 instead of a
connection reset, and the server still holds none of the body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import json_error

#: After a refusal, how long and how many bytes of the rest of the body are read and discarded.
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a request body may have, and the setting an operator raises to allow more."""

    max_bytes: int
    setting: str

    def message(self, what: str) -> str:
        return f"{what} is over {self.max_bytes} bytes ({self.setting}); send a smaller body"


class _BodyTooLargeError(Exception):
    """Raised into the application's read when the body crosses its limit."""


class BodyLimitMiddleware:
    """Bounds the request body of every HTTP request by `limit_for(method, path)`."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], BodyLimit]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit.max_bytes:
            message = limit.message(f"the request body ({int(declared)} bytes)")
            await _refuse(scope, receive, send, message, body_ended=False)
            return
        received = 0
        crossed = False
        ended = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, crossed, ended
            if crossed:  # an application that retries the read gets nothing more
                raise _BodyTooLargeError
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if received > limit.max_bytes:
                    crossed = True
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if crossed:  # its answer to a body it could not read is replaced by the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not crossed:
                raise
        if crossed and not started:
            await _refuse(scope, receive, send, limit.message("the request body"), body_ended=ended)


async def _refuse(scope: Scope, receive: Receive, send: Send, message: str, *, body_ended: bool) -> None:
    """Answer 413 in the route's error shape, linger over the rest of the body, then close."""
    response = json_error(Request(scope), message, "too_large", 413, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    # The whole answer goes out now; the response stays open (more_body) only so that the server
    # keeps reading, and so discarding, what the client is still sending.
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    if not body_ended:
        discarded = 0
        with anyio.move_on_after(LINGER_SECONDS):
            while discarded < LINGER_BYTES:
                chunk = await receive()
                if chunk["type"] != "http.request" or not chunk.get("more_body", False):
                    break
                discarded += len(chunk.get("body", b""))
    await send({"type": "http.response.body", "body": b"", "more_body": False})
