"""The router's checks on client input, in one place (pure: no HTTP, no NATS).

Everything a client sends is checked here before it names a subject or a key, or is encoded
for the mesh, so that no client input reaches a 5xx:

- every path parameter (``{model}``, ``{version}``, ``{id}``) and every model or version name in
  a body is a subject token (:func:`shared.names.check_name`: letters, digits, ``-``, ``_``);
- a JSON body that is not JSON, not valid UTF-8 or not of the route's shape is a 400;
- ``Aimesh-Timeout-Ms`` is a positive, finite number of milliseconds.

Each check raises :class:`BadRequest` naming the input and how to fix it; the route turns it
into its own error shape (``{"error": ...}``, or OpenAI's object under ``/v1/completions``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TypeVar

import msgspec

from shared.errors import BadRequest
from shared.names import check_name
from shared.schemas import Split

T = TypeVar("T")

# What each path parameter is called in error messages.
PATH_PARAMS = {"model": "model", "version": "version", "id": "request id"}  # as shared.durable says them
MAX_REQUEST_ID = 256


def check_path(params: Mapping[str, str]) -> None:
    """Every parameter of the matched route's path (URL-decoded) is a token."""
    for key, value in params.items():
        check_name(value, PATH_PARAMS.get(key, key))


def check_request_id(value: str) -> str:
    """A caller's id for a synchronous request (OIP ``id``): it travels in a response header and
    in exposures, so 1–256 printable characters without spaces (dots and colons are fine)."""
    if not value or len(value) > MAX_REQUEST_ID or any(c.isspace() or not c.isprintable() for c in value):
        raise BadRequest(f"request id {value[:64]!r} must be 1–{MAX_REQUEST_ID} printable characters without spaces")
    return value


def check_split(split: Split) -> Split:
    """The split's model and every version it names (variants, mirrors, control) are tokens."""
    check_name(split.model, "model name")
    for variant in split.variants:
        check_name(variant.version, "variant version")
    for mirror in split.mirrors:
        check_name(mirror.version, "mirror version")
    if split.control:
        check_name(split.control, "control version")
    return split


def decode(decoder: msgspec.json.Decoder[T], raw: bytes, what: str) -> T:
    """Decode a JSON body: 400 for bad JSON, bad UTF-8 inside a string, or a wrong shape."""
    try:
        return decoder.decode(raw)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"invalid {what}: a string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"invalid {what}: {exc}") from None


def timeout_s(raw: str | None, header: str, default_s: float) -> float:
    """The deadline a caller asks for in milliseconds, capped at ``default_s``."""
    if raw is None:
        return default_s
    try:
        asked = float(raw) / 1000
    except ValueError:
        raise BadRequest(f"{header} must be a number of milliseconds, not {raw[:32]!r}") from None
    if not math.isfinite(asked) or asked <= 0:
        raise BadRequest(f"{header} must be a positive, finite number of milliseconds, not {raw[:32]!r}")
    return min(asked, default_s)


def new_request_id() -> str:
    """A fresh request id: 32 random hex digits (uuid4's size, at a fifth of its cost)."""
    return os.urandom(16).hex()
