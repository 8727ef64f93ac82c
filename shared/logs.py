"""Structured logs: every record carries the service, the instance and the current trace and span
ids, so a log line leads to its trace.  Readable text by default, one JSON object per line with
``AIMESH_LOG_FORMAT=json``."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from shared.tracing import current_ids

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _ContextFilter(logging.Filter):
    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service = service
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.instance = self.instance
        ids = current_ids()
        record.trace_id, record.span_id = ids if ids else ("", "")
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = (
            f"{ts} {record.levelname:<7} {record.service}[{record.instance[:8]}] {record.name}: {record.getMessage()}"  # type: ignore[attr-defined]
        )
        if record.trace_id:  # type: ignore[attr-defined]
            line += f" trace_id={record.trace_id} span_id={record.span_id}"  # type: ignore[attr-defined]
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "service": getattr(record, "service", ""),
            "instance": getattr(record, "instance", ""),
            "logger": record.name,
            "msg": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(service: str, instance: str, *, fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(service, instance))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at ERROR through its own callbacks; we log those.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
