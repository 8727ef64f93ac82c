"""JSON Lines: one object per line.  Keys are columns; a numeric list is a vector column of fixed
length.  The first valid record (or the schema) fixes the columns and their types; a line that
is not JSON, misses a key, has a value of another type or length, NaN or ±inf is rejected."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from services.ingest.sources.common import (
    Block,
    LabelEncoder,
    RejectLog,
    Source,
    label_array,
    label_kind,
    pack_features,
)
from shared.errors import BadRequest
from shared.schemas import IngestRequest

BLOCK_RECORDS = 8192
_decoder = msgspec.json.Decoder()


class JsonlSource(Source):
    format = "jsonl"

    def __init__(self, paths: list[Path], request: IngestRequest, parse_threads: int = 2) -> None:
        super().__init__(paths, request, parse_threads)
        self._kinds: dict[str, tuple[str, int]] | None = None  # name -> (num|str, vector length or 0)
        # The label's kind, learnt from the first record; with a schema, from each block's values.
        self._label_kind: str | None = None

    def blocks(self, rejects: RejectLog) -> Iterator[Block]:
        encoder = LabelEncoder(self.label_classes)
        if self.request.schema:
            self._kinds = {
                c.name: ("str" if c.dtype == "str" else "num", c.shape[0] if c.shape else 0)
                for c in self.request.schema
            }
        done = 0
        for path in self.paths:
            rows: list[dict[str, Any]] = []
            read = 0
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    read += len(raw)
                    if not raw.strip():
                        continue
                    record = self._check(raw, number, str(path), rejects)
                    if record is not None:
                        rows.append(record)
                    if len(rows) >= BLOCK_RECORDS:
                        yield self._block(rows, encoder, done + read)
                        rows = []
            if rows:
                yield self._block(rows, encoder, done + read)
            done += read

    def _check(self, raw: bytes, number: int, source: str, rejects: RejectLog) -> dict[str, Any] | None:
        try:
            record = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            rejects.add(source, number, f"not JSON: {exc}")
            return None
        if not isinstance(record, dict):
            rejects.add(source, number, "not a JSON object")
            return None
        if self._kinds is None:
            self._learn(record, source, number)
        assert self._kinds is not None
        for name, (kind, length) in self._kinds.items():
            if name not in record:
                rejects.add(source, number, "missing", name)
                return None
            why = _problem(record[name], kind, length, self.request.max_text_bytes)
            if why:
                rejects.add(source, number, why, name)
                return None
        return record

    def _learn(self, record: dict[str, Any], source: str, number: int) -> None:
        kinds: dict[str, tuple[str, int]] = {}
        for name, value in record.items():
            if isinstance(value, (bool, int, float)):
                kinds[name] = ("num", 0)
            elif isinstance(value, str):
                kinds[name] = ("str", 0)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                kinds[name] = ("num", len(value))
            else:
                raise BadRequest(f"{source}:{number}: field {name!r} is neither a number, a string nor a numeric list")
        if self.request.label is not None and self.request.label not in kinds:
            raise BadRequest(f"{source}: no label field {self.request.label!r} (fields: {', '.join(kinds)})")
        self._kinds = kinds
        label = self.request.label
        skip = (label, self.request.shard_by)
        self.features = [n for n, (k, length) in kinds.items() if k == "num" and length == 0 and n not in skip]
        if label is not None:
            self._label_kind = (
                "class" if kinds[label][0] == "str" else ("int" if isinstance(record[label], int) else "float")
            )

    def _block(self, rows: list[dict[str, Any]], encoder: LabelEncoder, bytes_read: int) -> Block:
        assert self._kinds is not None
        columns: dict[str, np.ndarray] = {}
        for name, (kind, _) in self._kinds.items():
            values = [r[name] for r in rows]
            columns[name] = np.array(values, dtype=object if kind == "str" else np.float32)
        label = self.request.label
        label_values = None
        if label is not None:
            kind = self._label_kind or label_kind(columns[label].dtype)
            label_values = label_array(columns[label], kind, encoder)
        packed = pack_features(columns, self.features, label, label_values)
        if not self.features:  # a single vector column is the feature matrix
            vectors = [n for n, (k, length) in self._kinds.items() if k == "num" and length and n != label]
            if len(vectors) == 1:
                packed["x"] = packed.pop(vectors[0])
        return Block(packed, bytes_read)


def _problem(value: Any, kind: str, length: int, max_text: int) -> str | None:
    if kind == "str":
        if not isinstance(value, str):
            return f"expected a string, got {type(value).__name__}"
        return f"text longer than {max_text} bytes" if len(value) > max_text else None
    items = value if length else [value]
    if length and (not isinstance(value, list) or len(value) != length):
        return f"expected a list of {length} numbers"
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expected a number, got {type(v).__name__}"
        if math.isnan(v):
            return "NaN is not allowed"
        if math.isinf(v):
            return "±inf is not allowed"
    return None
