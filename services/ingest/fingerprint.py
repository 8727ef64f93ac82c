"""A job's fingerprint: the same input and options give the same fingerprint, so re-running an
ingest finds its earlier job (and its dataset version) instead of making a new one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

from shared.schemas import IngestRequest

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(request: IngestRequest, fmt: str, paths: list[Path]) -> str:
    """sha256 of the options that shape the data and of each input file's name and content.
    File names count relative to their common folder, so moving the folder changes nothing."""
    options = msgspec.structs.replace(request, paths=[], format=fmt)
    digest = hashlib.sha256(msgspec.json.encode(options))
    root = Path(*Path(paths[0]).parts[:-1]) if len(paths) == 1 else _common(paths)
    for path in paths:
        digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _common(paths: list[Path]) -> Path:
    parts = [p.parts for p in paths]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return Path(*common) if common else Path("/")
