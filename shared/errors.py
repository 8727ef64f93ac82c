"""The mesh's exceptions.

::

    MeshError
    ├── ConfigError (ValueError)            bad configuration; the process exits with code 2
    ├── ServiceError                        travels on the wire as (code, description)
    │   ├── BadRequest        400           the request does not decode or is invalid
    │   ├── Forbidden         403           valid, but not allowed (e.g. a path outside the ingest roots)
    │   ├── NotFound          404           unknown model, dataset, job, ...
    │   ├── PayloadTooLarge   413           a message over the bus's max_payload (or a stream's limit)
    │   ├── Overloaded        429           a full mailbox; retry later or add capacity
    │   ├── Unavailable       503           draining, not ready, no responders
    │   ├── DeadlineExceeded  504 (TimeoutError)
    │   └── InternalError     500           a bug; the traceback is in the service's log only
    └── MeshTimeout (TimeoutError)          a client gave up waiting for a reply

A handler raises a ``ServiceError`` subclass for expected failures; anything else becomes a 500
with a generic description (never ``repr(exc)`` on the wire). A client turns an error reply back
into the same class with :func:`error_from_code`.
"""

from __future__ import annotations

from typing import ClassVar


class MeshError(Exception):
    """Base of every aimesh error."""


class ConfigError(MeshError, ValueError):
    """Configuration that cannot work; says which setting and why."""


class MeshTimeout(MeshError, TimeoutError):
    """No reply arrived in time."""

    def __init__(self, subject: str, timeout_s: float) -> None:
        super().__init__(f"no reply on {subject} within {timeout_s:g}s")
        self.subject = subject
        self.timeout_s = timeout_s


class ServiceError(MeshError):
    """An error a service reports to its caller: a stable code and a short description."""

    code: ClassVar[int] = 500

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def __str__(self) -> str:
        return f"{self.code} {self.description}"


class BadRequest(ServiceError):
    code = 400


class Forbidden(ServiceError):
    code = 403


class NotFound(ServiceError):
    code = 404


class PayloadTooLarge(ServiceError):
    """A request or reply too large to travel: over the NATS server's ``max_payload`` (read from
    its INFO at connect) or over what a JetStream stream can hold."""

    code = 413


class Overloaded(ServiceError):
    code = 429

    def __init__(self, description: str, retry_after_s: float = 1.0) -> None:
        super().__init__(description)
        self.retry_after_s = retry_after_s


class InternalError(ServiceError):
    code = 500


class Unavailable(ServiceError):
    """Nothing can serve it now, and it surely did not run (or running it again is harmless):
    safe to retry, after ``retry_after_s`` when given (the gateway's ``Retry-After``)."""

    code = 503

    def __init__(self, description: str, retry_after_s: float | None = None) -> None:
        super().__init__(description)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError, TimeoutError):
    code = 504


_BY_CODE: dict[int, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Forbidden,
        NotFound,
        PayloadTooLarge,
        Overloaded,
        InternalError,
        Unavailable,
        DeadlineExceeded,
    )
}


def error_from_code(code: int, description: str) -> ServiceError:
    """Rebuild the typed error a service sent; unknown codes keep their number."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(description)
    err = ServiceError(description)
    err.code = code  # type: ignore[misc]  # an instance-level code for codes we do not know
    return err
