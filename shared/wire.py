"""Encoding replies and errors on the wire, shared by actors and clients."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from shared.errors import ServiceError, error_from_code
from shared.names import Header

_encoder = msgspec.msgpack.Encoder()


def encode(value: Any) -> bytes:
    """A handler's result as a reply body: bytes pass through, None is empty, else MessagePack."""
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return _encoder.encode(value)


def error_headers(err: ServiceError) -> dict[str, str]:
    return {Header.ERROR: err.description, Header.ERROR_CODE: str(err.code)}


def error_in(headers: Mapping[str, str] | None) -> ServiceError | None:
    """The error a reply carries in its micro-protocol headers, if any."""
    if not headers:
        return None
    code = headers.get(Header.ERROR_CODE)
    if code is None:
        return None
    try:
        number = int(code)
    except ValueError:
        number = 500
    return error_from_code(number, headers.get(Header.ERROR, "") or "error")


def deadline_header(timeout_s: float) -> str:
    """The absolute deadline (ms since the epoch) ``timeout_s`` from now."""
    return str(int((time.time() + timeout_s) * 1000))


def deadline_ms(headers: Mapping[str, str] | None) -> int | None:
    if not headers:
        return None
    raw = headers.get(Header.DEADLINE)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
