"""Error codes on the wire map back to the error tree (shared/errors.py)."""

from __future__ import annotations

from shared.errors import DeadlineExceeded, Overloaded, ServiceError, error_from_code


def test_error_codes_round_trip() -> None:
    assert isinstance(error_from_code(429, "busy"), Overloaded)
    assert isinstance(error_from_code(504, "late"), TimeoutError)
    assert isinstance(error_from_code(504, "late"), DeadlineExceeded)
    odd = error_from_code(418, "teapot")
    assert type(odd) is ServiceError and odd.code == 418
