"""Built-in demo data, made on the ingest service's own machine (nothing is downloaded):

- ``demo:digits``: scikit-learn's bundled handwritten digits (1,797 8×8 images, labels 0–9), read
  offline from the installed package and written as CSV (``p0``…``p63``, ``label``);
- ``demo:pytext``: the Python standard library's own sources of a few packages, a text corpus
  for the small language model.

Both are written once, deterministically (same bytes each time, so the same dataset version).

They live in a folder of the shared temp dir, so the service reads them only when that folder is
its own: a real folder (not a link), owned by the service's user, writable by no one else.  A
folder planted there by another user (links to files it cannot read itself) is refused, and the
demo files are read under that folder alone (:func:`roots`), not the service's roots.
"""

from __future__ import annotations

import os
import shutil
import stat
import sysconfig
import tempfile
from pathlib import Path

from services.ingest.access import Roots
from shared.errors import BadRequest, Forbidden

DEMO_DIR = Path(os.path.realpath(tempfile.gettempdir())) / "aimesh-demo"
PYTEXT_PACKAGES = ("json", "email", "asyncio", "collections", "concurrent")
DEMOS = {"demo:digits": ("digits.csv", "csv", "label"), "demo:pytext": ("pytext", "text", None)}


def resolve(paths: list[str]) -> tuple[list[str], str | None, str | None]:
    """Replace ``demo:`` names by files; returns (paths, format, label) — the last two only when
    the paths were a demo set."""
    if not any(p.startswith("demo:") for p in paths):
        return paths, None, None
    if len(paths) != 1 or paths[0] not in DEMOS:
        raise BadRequest(f"demo sets are ingested one at a time: {', '.join(DEMOS)}")
    name, fmt, label = DEMOS[paths[0]]
    target = DEMO_DIR / name
    DEMO_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_ours(DEMO_DIR)
    if not target.exists():
        (_write_digits if fmt == "csv" else _write_pytext)(target)
    return [str(target)], fmt, label


def roots() -> Roots:
    """The one folder demo files are read from (its final component not resolved: a link there
    leads out of it and is refused)."""
    return Roots([DEMO_DIR])


def _check_ours(folder: Path) -> None:
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise Forbidden(
            f"{folder} is not the ingest service's own folder (a link, another user's, or writable by others): "
            "remove it and ingest the demo again"
        )


def _write_digits(target: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    header = ",".join([*(f"p{i}" for i in range(64)), "label"])
    rows = [",".join([*(str(int(v)) for v in x), str(int(y))]) for x, y in zip(digits.data, digits.target, strict=True)]
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join([header, *rows]) + "\n")
    tmp.replace(target)


def _write_pytext(target: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tmp = target.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for package in PYTEXT_PACKAGES:
        for source in sorted((stdlib / package).glob("*.py")):
            dest = tmp / package / source.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
    tmp.replace(target)
