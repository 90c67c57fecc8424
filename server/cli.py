"""`cpm2 serve` (and `python -m server`): settings from flags or `CPM2_*`, uvicorn, graceful drain.

SIGTERM (or Ctrl-C) starts draining instead of stopping: /ready turns 503 and new requests get 503
at once, while the listener stays open and running requests finish; once the engine is idle (or
`shutdown_timeout` passes) the process exits. A second signal exits immediately.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from types import FrameType
from typing import Any

from server.settings import Settings

log = logging.getLogger("cpm2.server")


def _flags() -> list[tuple[str, dict[str, Any]]]:
    fields = Settings.model_fields
    flags = []
    for name, info in fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": None,
            "help": (info.description or "") + f" [CPM2_{name.upper()}]",
        }
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        flags.append((flag, kwargs))
    return flags


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


def drop_query_string(record: logging.LogRecord) -> bool:
    """uvicorn access-log filter: log the path without its query string.

    A client that puts its key in the URL (`?api_key=...`) would otherwise have it written to every
    access log line; the server never reads credentials from the query, so nothing is lost.
    """
    args = record.args
    # uvicorn's access record: (client_addr, method, path_with_query, http_version, status_code).
    if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
        record.args = (args[0], args[1], args[2].partition("?")[0], *args[3:])
    return True


def uvicorn_config(app: Any, settings: Settings) -> Any:
    """uvicorn's config for `app` under `settings` (also what the tests run a real server with)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
        lifespan="on",
        # Client addresses from forwarding headers only behind the proxies the operator lists
        # (uvicorn would otherwise believe any peer on 127.0.0.1).
        proxy_headers=bool(settings.forwarded_allow_ips.strip()),
        forwarded_allow_ips=settings.forwarded_allow_ips.strip() or None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    # After uvicorn.Config, which configures uvicorn's loggers (a filter added before could be lost).
    logging.getLogger("uvicorn.access").addFilter(drop_query_string)
    server = DrainingServer(config, app=app, timeout=settings.shutdown_timeout)
    server.run()
    return 0


class DrainingServer:
    """uvicorn.Server whose first exit signal drains before exiting."""

    def __init__(self, config: Any, *, app: Any, timeout: float) -> None:
        import uvicorn

        self.app = app
        self.timeout = timeout
        self._draining = False
        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                if outer._draining:
                    super().handle_exit(sig, frame)
                    self.force_exit = True
                    return
                outer._draining = True
                ctx = getattr(outer.app.state, "ctx", None)
                if ctx is None:  # not started yet: nothing to drain
                    super().handle_exit(sig, frame)
                    return
                ctx.draining = True
                ctx.metrics.ready.set(0)
                ctx.metrics.draining.set(1)
                log.info(
                    "draining: finishing %d running request(s), up to %.0f s",
                    ctx.service.in_flight,
                    outer.timeout,
                )
                asyncio.get_event_loop().create_task(self._drain_then_exit(ctx, sig, frame))

            async def _drain_then_exit(self, ctx: Any, sig: int, frame: FrameType | None) -> None:
                deadline = time.monotonic() + outer.timeout
                while ctx.service.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                # Not handle_exit(): uvicorn would re-raise the signal at exit, and a drained
                # server is a clean exit (status 0), not a death by SIGTERM.
                self.should_exit = True

        self.server = _Server(config)

    def run(self) -> None:
        self.server.run()


def register(subparsers: Any) -> None:
    """Add `cpm2 serve` to the `cpm2` command."""
    p = subparsers.add_parser("serve", help="start the HTTP server (TGI- and OpenAI-compatible, runtime soft prompts)")
    for flag, kwargs in _flags():
        p.add_argument(flag, **kwargs)
    p.set_defaults(handler=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description="cpm2 HTTP server")
    for flag, kwargs in _flags():
        parser.add_argument(flag, **kwargs)
    return cmd_serve(parser.parse_args(argv))


__all__ = ["main", "register"]
