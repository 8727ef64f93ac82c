"""Timestamps as the wire shows them: RFC 3339, UTC, milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def rfc3339_now() -> str:
    return rfc3339(datetime.now(UTC))


def rfc3339_from_ts(ts: float) -> str:
    return rfc3339(datetime.fromtimestamp(ts, UTC))
