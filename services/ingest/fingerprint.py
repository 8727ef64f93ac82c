"""A job's fingerprint: the same input and options give the same fingerprint, so re-running an
ingest finds its earlier job (and its dataset version) instead of making a new one.

Files are identified by name (relative to their common folder), size and modification time,
the way make and rsync decide that a file changed, rather than by hashing their content: that
would read the whole input once more before the job could start (0.16 s per 290 MB here).  The
data itself is checksummed per shard in the manifest.

An upload (``IngestRequest.object``) is identified by its name, size and the sha256 digest the
object store keeps for it: the same upload is the same job, and a job whose upload was replaced
after it was submitted notices (its fingerprint no longer matches) instead of ingesting other
data under the same version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

from shared.schemas import IngestRequest


def fingerprint(request: IngestRequest, fmt: str, paths: list[Path]) -> str:
    """sha256 of the options that shape the data and of each input file's identity."""
    digest = hashlib.sha256(_options(request, fmt))
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


def upload_fingerprint(request: IngestRequest, fmt: str, size: int, digest: str) -> str:
    """sha256 of the options that shape the data and of the upload's identity."""
    digest_of = hashlib.sha256(_options(request, fmt))
    digest_of.update(f"upload\0{request.object}\0{size}\0{digest}\n".encode())
    return digest_of.hexdigest()


def _options(request: IngestRequest, fmt: str) -> bytes:
    """The request's options as JSON, without the input.  ``object`` is left out when unset, so
    path jobs keep the fingerprints they had before uploads existed (and their versions)."""
    options = msgspec.to_builtins(msgspec.structs.replace(request, paths=[], format=fmt))
    if options.get("object") is None:
        options.pop("object", None)
    return msgspec.json.encode(options)
