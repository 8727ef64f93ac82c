"""The torch side of a rendezvous: rank 0's TCPStore, listening only on the job's address.

torch's ``TCPStore`` server binds the wildcard address (``::``, every interface) whatever host
it is given, for the whole attempt, and it has no authentication: whoever reaches the port can
read and write the job's keys, among them the addresses the ranks use to connect to each other.
So rank 0 binds the listening socket itself, on the host of the job's ``master`` (its agent's
``TrainerConfig.host``, 127.0.0.1 by default), and hands it to the store (``master_listen_fd``).

The collectives listen too: gloo on the address its device resolves (by default the machine's
hostname), NCCL's bootstrap on the interface it picks.  :func:`collective_env` names the
interface that holds this node's host, for ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``
(a value already set in the environment wins).

The store still has no per-job secret (torch offers none), so binding is the mitigation, with the
port living only as long as one attempt; see docs/security-code.md.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping
from datetime import timedelta

import psutil
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # public, not re-exported in the stubs


def split_master(master: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port)."""
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"master address {master!r} must look like host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def listen_on(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` only (not the wildcard address), listening."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def create_store(master: str, rank: int, world: int, timeout: timedelta) -> TCPStore:
    """The attempt's store: rank 0 serves it on ``master``'s address only; the others connect."""
    host, port = split_master(master)
    if rank != 0:
        return TCPStore(host, port, world, False, timeout)
    fd = listen_on(host, port).detach()  # the store owns the socket from here, and closes it
    try:
        return TCPStore(host, port, world, True, timeout, master_listen_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            socket.close(fd)
        raise


def interface_of(host: str) -> str | None:
    """The network interface holding ``host``'s address on this machine, if one does."""
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] in wanted for a in addresses):
            return name
    return None


def collective_env(host: str, env: Mapping[str, str]) -> dict[str, str]:
    """Variables that keep gloo's and NCCL's listening sockets on ``host``'s interface; empty
    when no interface holds it (the libraries then choose, as before) or they are already set."""
    name = interface_of(host)
    if name is None:
        return {}
    out: dict[str, str] = {}
    if "GLOO_SOCKET_IFNAME" not in env:
        out["GLOO_SOCKET_IFNAME"] = name
    if "NCCL_SOCKET_IFNAME" not in env:
        out["NCCL_SOCKET_IFNAME"] = f"={name}"  # "=": exactly this interface, not every one it prefixes
    return out
