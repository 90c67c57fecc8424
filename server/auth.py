"""Credentials: an optional API key for generation routes and an admin token for prompt writes.

Keys are compared in constant time (`hmac.compare_digest`) and never logged or echoed. Prompt writes
are closed unless the operator opens them: with an admin token (always required once set), or, with
no token, by opting in to trust loopback peers (`CPM2_ALLOW_LOCAL_ADMIN`). That trust cannot be
narrower than "every process that reaches the socket from this host": a reverse proxy, a service-mesh
sidecar, `kubectl port-forward` or an SSH tunnel all connect from loopback on behalf of remote
clients, which is why it is opt-in. A request that carries forwarding headers came through a proxy
and is never local, whoever the proxy says the client is.
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


#: Headers a proxy adds for the client it forwards (RFC 7239 and the de-facto X- headers).
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host", "x-forwarded-proto")

FORBIDDEN_WRITES = (
    "prompt writes are disabled: set CPM2_ADMIN_TOKEN on the server and send 'Authorization: Bearer <token>', "
    "or start it with --allow-local-admin (CPM2_ALLOW_LOCAL_ADMIN=1) to accept them from this machine without "
    "a token (that trusts every loopback peer, proxies on this host included)"
)


def is_local_peer(request: Request) -> bool:
    """The peer is a loopback address and the request was not forwarded by a proxy."""
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_key(request: Request, api_key: str | None, *, body_key: str | None = None) -> None:
    """Generation routes: the API key, when one is configured. `body_key`: the key a LibreTranslate
    client sends in the request body (`api_key`), taken when no header carries one."""
    if api_key is not None and not _matches(_bearer(request) or body_key, api_key):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")


def check_admin(request: Request, admin_token: str | None, *, allow_local: bool) -> None:
    """Prompt writes: the admin token when one is set; without one, a local peer if the operator
    opted in (`allow_local`); otherwise refused (403, saying how to enable them)."""
    if admin_token is not None:
        if not _matches(_bearer(request), admin_token):
            raise UnauthorizedError("missing or wrong admin token: send 'Authorization: Bearer <token>'")
        return
    if allow_local and is_local_peer(request):
        return
    if allow_local:
        raise ForbiddenError(
            "prompt writes without an admin token are accepted only from this machine, not through a proxy: "
            "set CPM2_ADMIN_TOKEN and send 'Authorization: Bearer <token>'"
        )
    raise ForbiddenError(FORBIDDEN_WRITES)
