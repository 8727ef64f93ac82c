"""Running one service as a process: ``python -m services.<name>`` and ``aimesh run <name>``.

The runner installs uvloop, reads the mesh's configuration, sets up logging, builds the service
with its own settings (:meth:`Service.from_env`: defaults, the TOML file, ``AIMESH_*`` variables),
starts it and waits for SIGTERM or SIGINT (either one sets an event; nothing polls), then drains
it; further signals are ignored, so a repeated SIGTERM never cuts a drain short or changes the
exit code.

Exit codes: 0 after a clean drain, 2 for a configuration error, 1 for any other failure.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import NoReturn

import msgspec
import uvloop

from shared.config import load_mesh_config
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.service import Service, new_instance_id

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


async def serve(service: Service, stop: asyncio.Event | None = None) -> None:
    """Start ``service``, wait for a stop signal, drain."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.ensure_future(service.start())
        stopping = asyncio.ensure_future(stop.wait())
        # A signal while still connecting (NATS unreachable) must not wait for the connection.
        await asyncio.wait({start, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        else:
            start.result()  # raise a start failure
            await stopping
    finally:
        # A second signal while draining changes nothing (the drain has its own timeout), and one
        # after it must not turn a clean exit into death by signal: ignore both from here on.
        await service.drain()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


def run_service(service_cls: type[Service]) -> NoReturn:
    """The whole life of a service process; never returns."""
    try:
        config = load_mesh_config()
    except ConfigError as exc:
        print(f"aimesh {service_cls.name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if config.instance is None:
        config = msgspec.structs.replace(config, instance=new_instance_id())
    setup_logging(service_cls.name, config.instance or "", fmt=config.log_format, level=config.log_level)
    try:
        service = service_cls.from_env(config)
        uvloop.run(serve(service))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(EXIT_CONFIG)
    except Exception:
        log.exception("%s failed", service_cls.name)
        sys.exit(EXIT_FAILED)
    sys.exit(EXIT_OK)
