"""Where the ingest service may read: regular files (and, for text, folders) under its roots.

A submitted path is a request to read a file *on the service's machine* with the service's
rights, so it is checked before anything is opened or stat'ed:

1. relative paths are taken relative to the first root;
2. the path, normalised without touching the filesystem (``..`` folded), must lie in a root:
   a path outside gets :class:`Forbidden` with the same message whether it exists or not;
3. its real path (every symlink followed, existing or not) must lie in a resolved root too, so
   a link inside a root that points out of it is refused the same way;
4. only then is it stat'ed: missing is a 400, anything but a regular file (a folder where a
   file is wanted, a FIFO, a device, a socket) is a 403.

"In a root" compares whole path components (``Path.is_relative_to``), so ``/data2`` is not in
``/data``.  Roots are resolved once, when the service starts.

What is left: a process that can write inside a root could swap a checked file for a link
between the check and the open.  The job re-checks its paths when it runs, but the window
between that check and the open remains; grant write access to the roots accordingly.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from services.ingest.printable import printable
from shared.errors import BadRequest, ConfigError, Forbidden


class Roots:
    """The folders reads are confined to.  ``dirs`` are absolute and already resolved (see
    :meth:`from_config`); ``aliases`` are the same folders as configured, for the lexical check."""

    def __init__(self, dirs: Sequence[Path], aliases: Sequence[Path] = ()) -> None:
        if not dirs:
            raise ValueError("at least one root")
        self.dirs = list(dirs)
        self._lexical = [*self.dirs, *aliases]

    @classmethod
    def from_config(cls, configured: Sequence[str], cwd: Path | None = None) -> Roots:
        """The configured roots (``[ingest] roots``), or the working directory when none; each
        must be an existing folder."""
        base = Path.cwd() if cwd is None else cwd
        dirs: list[Path] = []
        aliases: list[Path] = []
        for item in configured or [str(base)]:
            given = base / Path(item).expanduser()
            try:
                real = given.resolve(strict=True)
            except OSError as exc:
                raise ConfigError(f"[ingest] roots: {item}: {exc.strerror or exc}") from None
            if not real.is_dir():
                raise ConfigError(f"[ingest] roots: {item} is not a directory")
            dirs.append(real)
            aliases.append(Path(os.path.normpath(given)))
        return cls(dirs, aliases)

    def __str__(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    # -- checks ------------------------------------------------------------------------------
    def resolve(self, raw: str, *, folders: bool = False) -> Path:
        """The real path of ``raw``, a regular file (or a folder, when ``folders``) in a root."""
        shown = printable(raw)
        if "\0" in raw:
            raise BadRequest(f"{shown}: a path cannot hold a NUL character")
        given = Path(raw)
        if not given.is_absolute():
            given = self.dirs[0] / given
        # Before any system call on the path: outside is outside, whether it exists or not.
        if not _inside(Path(os.path.normpath(given)), self._lexical):
            raise self._outside(shown)
        real = Path(os.path.realpath(given))
        if not _inside(real, self.dirs):
            raise self._outside(shown)
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise BadRequest(f"{shown}: no such file or directory (as the ingest service sees it)") from None
        except OSError as exc:
            raise Forbidden(f"{shown}: the ingest service cannot read it ({exc.strerror or 'error'})") from None
        if stat.S_ISDIR(mode):
            if folders:
                return real
            raise Forbidden(f"{shown}: is a folder, not a file (folders are read only as text: --format text)")
        if not stat.S_ISREG(mode):
            raise Forbidden(f"{shown}: not a regular file (FIFOs, devices and sockets are never read)")
        return real

    def files_under(self, folder: Path) -> list[Path]:
        """Regular files under ``folder`` (already checked), recursively, sorted; hidden files and
        folders and ``__pycache__`` skipped, other non-regular entries skipped, symlinked folders
        not entered.  A file whose link leads out of the roots is refused, naming the link."""
        found: list[tuple[tuple[str, ...], Path]] = []  # (where in the folder, real path)
        for top, subdirs, names in os.walk(folder, followlinks=False):
            subdirs[:] = [d for d in subdirs if not _hidden(d)]
            for name in names:
                if _hidden(name):
                    continue
                path = Path(top) / name
                real = Path(os.path.realpath(path))
                if not _inside(real, self.dirs):
                    raise self._outside(printable(str(path)))
                try:
                    if stat.S_ISREG(os.stat(real).st_mode):
                        found.append((path.relative_to(folder).parts, real))
                except OSError:
                    continue  # a dangling link inside the roots: nothing to read
        return [real for _, real in sorted(found)]

    def _outside(self, shown: str) -> Forbidden:
        return Forbidden(
            f"{shown}: outside the folders the ingest service reads ({self}): move the file under one "
            "of them, add its folder to the service's [ingest] roots (AIMESH_INGEST_ROOTS), or send it "
            "with `aimesh ingest --upload`"
        )


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"
