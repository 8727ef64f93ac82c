"""Serving an aiohttp application on a host and port (0 picks a free port)."""

from __future__ import annotations

import ssl

from aiohttp import web


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Start ``app``; returns its runner (``await runner.cleanup()`` to stop) and its base URL.
    ``reuse_port`` lets several processes listen on one port (the kernel spreads connections);
    ``ssl_context`` serves HTTPS."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_context)
    await site.start()
    sockets = getattr(site._server, "sockets", None)  # aiohttp exposes the bound port only here
    if sockets:
        port = sockets[0].getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{host}:{port}"
