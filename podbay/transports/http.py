"""The webhook server: one aiohttp application shared by the webhook transports.

Slack (and later WhatsApp) receive events over HTTP. Rather than each opening a port, they
mount their routes on one :class:`WebhookServer` listening on ``[http] host``/``port``.
podbay's lifecycle creates the server, lets every enabled transport call :meth:`add_route`,
starts it only when some route was mounted (:attr:`WebhookServer.needed`) and stops it at
shutdown. Routes can be added before :meth:`start` only.

What the server does besides routing, for every route:

- ``GET /healthz`` answers ``200 {"ok": true}`` (for load balancers and tunnels).
- Request bodies are limited to ``[http] max_body_bytes``: a larger Content-Length is refused
  with 413 before any of the body is read, and a chunked body that grows past the limit is
  refused with 413 when the handler reads it.
- A handler that raises gets a generic 500 (no traceback leaves the process); the traceback
  goes to the log under the request's method and path.
- The access log (logger ``podbay.http``) has one line per request: method, path, status,
  response size and duration. It never prints the query string, headers or body, which may
  carry tokens and message text.

There is no authentication here: each platform checks its own signatures (bolt does Slack's).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from podbay.config import HttpConfig
from podbay.errors import ConfigError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("podbay.http")

HEALTHZ = "/healthz"
# In-flight requests get this long to finish when the server stops (platforms retry).
SHUTDOWN_TIMEOUT_S = 5.0


class _AccessLogger(AbstractAccessLogger):
    """One line per request; the path without its query, never headers or body."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d bytes %.1f ms",
            request.method,
            request.rel_url.raw_path,  # percent-encoded: no control characters in the log
            response.status,
            response.body_length,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _too_large(limit: int) -> web.Response:
    return web.Response(status=413, text=f"request body too large (limit {limit} bytes)\n")


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


class WebhookServer:
    """One aiohttp app on ``[http] host:port``; transports mount routes before :meth:`start`."""

    def __init__(self, config: HttpConfig) -> None:
        self._config = config
        self._app = web.Application(
            client_max_size=config.max_body_bytes,
            middlewares=[self._guard],
        )
        self._app.router.add_get(HEALTHZ, _healthz)
        self._routes: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._started = False

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Mount ``handler`` for ``method`` and ``path``; before :meth:`start` only."""
        if self._started:
            raise RuntimeError(
                f"cannot add route {method.upper()} {path}: the webhook server already started"
            )
        method = method.upper()
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/', got {path!r}")
        if path == HEALTHZ:
            raise ValueError(f"{HEALTHZ} is reserved for the webhook server's health check")
        if (method, path) in self._routes:
            raise ValueError(f"route {method} {path} is already mounted")
        self._app.router.add_route(method, path, handler)
        self._routes.append((method, path))

    @property
    def routes(self) -> list[tuple[str, str]]:
        """Mounted ``(method, path)`` pairs, in order, not counting ``/healthz``."""
        return list(self._routes)

    @property
    def needed(self) -> bool:
        """Whether any transport mounted a route (podbay starts the server only then)."""
        return bool(self._routes)

    async def start(self) -> None:
        """Listen on ``[http] host:port``; a port that cannot be bound is a ConfigError."""
        if self._started:
            raise RuntimeError("the webhook server was already started")
        self._started = True
        host, port = self._config.host, self._config.port
        runner = web.AppRunner(
            self._app,
            access_log_class=_AccessLogger,
            access_log=log,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(
                f"http.host/http.port: cannot listen on {_join(host, port)}: "
                f"{exc.strerror or exc}; set http.port to a free port (or 0 for any free "
                "port) and http.host to an address of this machine"
            ) from exc
        self._port = int(runner.addresses[0][1])
        log.info("webhook server listening on %s", self.local_url())

    async def stop(self) -> None:
        """Stop listening and close connections; idempotent, safe if never started."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def port(self) -> int:
        """The bound port once started (the real one when ``http.port`` is 0)."""
        return self._port if self._port is not None else self._config.port

    def local_url(self, path: str = "") -> str:
        """``http://host:port<path>`` of this machine's listener."""
        return f"http://{_join(self._config.host, self.port)}{path}"

    def public_url(self, path: str = "") -> str:
        """The URL the platforms reach ``path`` at: ``[http] public_url`` when set."""
        if self._config.public_url:
            return self._config.public_url + path
        return self.local_url(path)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Middleware: the body limit, and a generic 500 for a handler that raises."""
        limit = self._config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return _too_large(limit)  # before any of the body is read
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _too_large(limit)  # a chunked body grew past client_max_size
        except web.HTTPException:
            raise  # 404, 405 and whatever a handler raises on purpose
        except Exception:
            path = request.rel_url.raw_path
            log.exception("webhook handler failed: %s %s", request.method, path)
            return web.Response(status=500, text="internal server error\n")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
