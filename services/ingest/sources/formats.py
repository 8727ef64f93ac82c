"""Which source reads an input: formats by name and file suffix, the request's checks, and
:func:`open_source`.  Kept apart from ``common.py``, which every source imports."""

from __future__ import annotations

from pathlib import Path

from services.ingest.access import Roots
from services.ingest.printable import FIELD_CHARS, printable
from services.ingest.sources.arrays import NpySource, NpzSource
from services.ingest.sources.common import Source
from services.ingest.sources.csv import CsvSource
from services.ingest.sources.jsonl import JsonlSource
from services.ingest.sources.text import TextSource
from shared.errors import BadRequest, Forbidden
from shared.schemas import IngestRequest

FORMATS = ("csv", "jsonl", "npy", "npz", "text")
_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npy": "npy", ".npz": "npz", ".txt": "text"}
_SOURCES: dict[str, type[Source]] = {
    "csv": CsvSource,
    "jsonl": JsonlSource,
    "npy": NpySource,
    "npz": NpzSource,
    "text": TextSource,
}


def format_for_name(name: str) -> str | None:
    """The format a file name's extension says, if any."""
    return _BY_SUFFIX.get(Path(name).suffix.lower())


def infer_format(paths: list[Path]) -> str:
    if len(paths) == 1 and paths[0].is_dir():
        return "text"
    suffixes = {p.suffix.lower() for p in paths}
    formats = {format_for_name(p.name) for p in paths}
    if len(formats) != 1 or None in formats:
        shown = printable(", ".join(sorted(suffixes)) or "none", FIELD_CHARS)
        raise BadRequest(f"cannot tell the format from the file names ({shown}): pass --format ({'|'.join(FORMATS)})")
    return str(formats.pop())


def resolve_paths(raw: list[str], roots: Roots) -> list[Path]:
    """The real paths of the files and folders named, each checked against ``roots`` before
    anything else touches it (:meth:`Roots.resolve`)."""
    if not raw:
        raise BadRequest("no input given: name paths, or the object of an upload")
    return [roots.resolve(item, folders=True) for item in raw]


def text_files(paths: list[Path], roots: Roots) -> list[Path]:
    """Files named, and regular files under folders named (sorted; hidden files and folders and
    ``__pycache__`` skipped)."""
    files: list[Path] = []
    for path in paths:
        files.extend(roots.files_under(path) if path.is_dir() else [path])
    return files


def open_source(request: IngestRequest, roots: Roots | None = None, *, parse_threads: int = 2) -> Source:
    """Validate the request against its input and return the source to read it.  Nothing outside
    ``roots`` (default: the working directory) is opened or stat'ed."""
    if request.shards < 1:
        raise BadRequest(f"shards must be at least 1 (got {request.shards})")
    if not 0 <= request.max_reject_ratio <= 1:
        raise BadRequest(f"max_reject_ratio must be between 0 and 1 (got {request.max_reject_ratio})")
    roots = roots or Roots.from_config([])
    inputs = paths = resolve_paths(request.paths, roots)
    fmt = request.format or infer_format(paths)
    if fmt not in FORMATS:
        raise BadRequest(f"unknown format {printable(repr(fmt), FIELD_CHARS)}: use one of {', '.join(FORMATS)}")
    if fmt == "text":
        paths = text_files(paths, roots)
    else:
        for path in paths:
            if path.is_dir():
                raise Forbidden(
                    f"{printable(str(path))}: is a folder, not a file (folders are read only as text; for {fmt}, "
                    "name the files)"
                )
    if not paths or all(p.stat().st_size == 0 for p in paths):
        raise BadRequest("the input is empty")
    source = _SOURCES[fmt](paths, request, parse_threads)
    source.inputs = inputs
    return source
