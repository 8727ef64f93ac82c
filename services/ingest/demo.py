"""Built-in demo data, made on the ingest service's own machine (nothing is downloaded):

- ``demo:digits``: scikit-learn's bundled handwritten digits (1,797 8×8 images, labels 0–9), read
  offline from the installed package and written as CSV (``p0``…``p63``, ``label``);
- ``demo:pytext``: the Python standard library's own sources of a few packages, a text corpus
  for the small language model.

Both are written once, deterministically (same bytes each time, so the same dataset version).
"""

from __future__ import annotations

import shutil
import sysconfig
import tempfile
from pathlib import Path

from shared.errors import BadRequest

DEMO_DIR = Path(tempfile.gettempdir()) / "aimesh-demo"
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
    if not target.exists():
        DEMO_DIR.mkdir(parents=True, exist_ok=True)
        (_write_digits if fmt == "csv" else _write_pytext)(target)
    return [str(target)], fmt, label


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
