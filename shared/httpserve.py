"""Serving an aiohttp application on a host and port (0 picks a free port), safe from slow clients.

- A request head (request line and headers) must arrive within ``header_timeout_s`` of the
  connection's opening or of its previous response, else the connection is closed: aiohttp's
  keep-alive timer is armed at both moments and closes a connection still waiting for a head
  (bytes trickling in do not re-arm it), so it is the header timeout, and an idle keep-alive
  connection is closed after as long.
- A request body must arrive within a body timeout: :func:`read_body` reads it once under a
  deadline (``request.read()`` caches it, so a handler's own ``read()`` gets the cached bytes);
  :func:`body_deadline` is that as a middleware, answering 408 ``{"error"}`` and closing the
  connection.
- A request aiohttp cannot parse (a NUL in a header, a bad request line) is answered 400 by
  aiohttp and logged in one line at DEBUG, not as an ERROR with a traceback: it is the
  client's fault, and every client could flood the log with them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0


log = logging.getLogger(__name__)


class _ClientFaults(logging.Filter):
    """Requests that could not be parsed go to DEBUG in one line (see the module's doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            log.debug("malformed HTTP request: %s", str(exc).replace("\n", " ")[:300])
            return False
        return True


SERVER_LOG = logging.getLogger("aimesh.http.server")  # aiohttp's server logger, for our apps
SERVER_LOG.addFilter(_ClientFaults())


class BodyTimeout(Exception):
    """The request body did not arrive within the deadline."""


async def read_body(request: web.Request, timeout_s: float) -> None:
    """Read (and cache) a request's body within ``timeout_s``; :class:`BodyTimeout` when late.
    A request without a body is not waited for."""
    if not request.body_exists:
        return
    if request.content.is_eof():  # all of it is in already (most small bodies): no timer to arm
        await request.read()
        return
    try:
        async with asyncio.timeout(timeout_s):
            await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None


def timed_out(response: web.StreamResponse) -> web.StreamResponse:
    """A 408 closes its connection: the rest of a late body is not worth waiting for."""
    response.force_close()
    return response


def body_deadline(timeout_s: float = BODY_TIMEOUT_S) -> Any:
    """A middleware: every request's body within ``timeout_s``, else 408 ``{"error": ...}``."""

    @web.middleware
    async def deadline(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            await read_body(request, timeout_s)
        except BodyTimeout as exc:
            return timed_out(web.json_response({"error": str(exc)}, status=408))
        response: web.StreamResponse = await handler(request)
        return response

    return deadline


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
) -> tuple[web.AppRunner, str]:
    """Start ``app``; returns its runner (``await runner.cleanup()`` to stop) and its base URL.
    ``reuse_port`` lets several processes listen on one port (the kernel spreads connections);
    ``ssl_context`` serves HTTPS; ``header_timeout_s`` bounds the wait for a request head."""
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be positive, got {header_timeout_s}")
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=header_timeout_s, logger=SERVER_LOG
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_context)
    await site.start()
    sockets = getattr(site._server, "sockets", None)  # aiohttp exposes the bound port only here
    if sockets:
        port = sockets[0].getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{host}:{port}"
