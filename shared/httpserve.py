"""Serving an aiohttp application on a host and port (0 picks a free port)."""

from __future__ import annotations

from aiohttp import web


async def serve_app(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False
) -> tuple[web.AppRunner, str]:
    """Start ``app``; returns its runner (``await runner.cleanup()`` to stop) and its base URL.
    ``reuse_port`` lets several processes listen on one port (the kernel spreads connections)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    sockets = getattr(site._server, "sockets", None)  # aiohttp exposes the bound port only here
    if sockets:
        port = sockets[0].getsockname()[1]
    return runner, f"http://{host}:{port}"
