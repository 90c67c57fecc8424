"""Credentials: an optional API key for generation routes and an admin token for prompt writes.

Keys are compared in constant time (`hmac.compare_digest`) and never logged or echoed. Without an
admin token, prompt uploads and deletes are accepted only from loopback clients, and the server
says so at start-up.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from server.errors import ForbiddenError, UnauthorizedError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    if host in ("testclient", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_key(request: Request, api_key: str | None, *, body_key: str | None = None) -> None:
    """Generation routes: the API key, when one is configured. `body_key`: the key a LibreTranslate
    client sends in the request body (`api_key`), taken when no header carries one."""
    if api_key is not None and not _matches(_bearer(request) or body_key, api_key):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")


def check_admin(request: Request, admin_token: str | None) -> None:
    """Prompt writes: the admin token, or a loopback client when no token is configured."""
    if admin_token is None:
        if not is_loopback(request):
            raise ForbiddenError("prompt writes are only accepted from this machine unless CPM2_ADMIN_TOKEN is set")
        return
    if not _matches(_bearer(request), admin_token):
        raise UnauthorizedError("missing or wrong admin token: send 'Authorization: Bearer <token>'")
