"""A job's fingerprint: the same input and options give the same fingerprint, so re-running an
ingest finds its earlier job (and its dataset version) instead of making a new one.

Files are identified by name (relative to their common folder), size and modification time,
the way make and rsync decide that a file changed, rather than by hashing their content: that
would read the whole input once more before the job could start (0.16 s per 290 MB here).  The
data itself is checksummed per shard in the manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

from shared.schemas import IngestRequest


def fingerprint(request: IngestRequest, fmt: str, paths: list[Path]) -> str:
    """sha256 of the options that shape the data and of each input file's identity."""
    options = msgspec.structs.replace(request, paths=[], format=fmt)
    digest = hashlib.sha256(msgspec.json.encode(options))
    root = paths[0].parent if len(paths) == 1 else _common(paths)
    for path in paths:
        stat = path.stat()
        name = path.relative_to(root) if path.is_relative_to(root) else path.name
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _common(paths: list[Path]) -> Path:
    parts = [p.parts for p in paths]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return Path(*common) if common else Path("/")
