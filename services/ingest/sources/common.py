"""What every source shares: blocks, the reject log, feature packing, format detection."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.ingest.printable import FIELD_CHARS, printable
from shared.schemas import IngestRequest, RejectedRow, TokenizerSpec

REJECTS_KEPT = 100  # the report keeps the first ones with details; all are counted


@dataclass
class Block:
    """Parsed records: columns of equal length, and how far into the input we are."""

    columns: dict[str, np.ndarray]
    bytes_read: int

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class RejectLog:
    """Every rejected record is counted; the first ``keep`` are kept with line and reason."""

    keep: int = REJECTS_KEPT
    count: int = 0
    rows: list[RejectedRow] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, source: str, line: int, reason: str, column: str | None = None) -> None:
        """Count a reject; keep it while fewer than ``keep`` are kept.  Its strings may hold bytes
        of the input (a column name from the header, a value, a file name): they are kept
        escaped and bounded (:func:`printable`)."""
        with self._lock:
            self.count += 1
            if len(self.rows) < self.keep:
                self.rows.append(
                    RejectedRow(
                        source=printable(source, FIELD_CHARS),
                        line=line,
                        column=None if column is None else printable(column, FIELD_CHARS),
                        reason=printable(reason, FIELD_CHARS),
                    )
                )


class Source(ABC):
    """One job's input.  ``blocks()`` may be called once; ``columns`` etc. are known after the
    first block."""

    format: str

    def __init__(self, paths: list[Path], request: IngestRequest, parse_threads: int = 2) -> None:
        self.paths = paths
        self.inputs = paths  # the files and folders named, resolved (open_source sets them)
        self.request = request
        self.parse_threads = max(1, parse_threads)  # how many chunks a columnar parser works on at once
        self.bytes_total = sum(p.stat().st_size for p in paths)
        self.label: str | None = request.label
        self.label_classes: list[str] = []
        self.features: list[str] = []
        self.tokenizer: TokenizerSpec | None = None

    @abstractmethod
    def blocks(self, rejects: RejectLog) -> Iterator[Block]: ...


def pack_features(
    columns: dict[str, np.ndarray], features: list[str], label: str | None, label_values: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Scalar numeric features become one float32 matrix ``x`` (what a model takes); the label
    becomes ``y``; other columns keep their names."""
    out: dict[str, np.ndarray] = {}
    if features:
        out["x"] = np.stack([columns[f].astype(np.float32, copy=False) for f in features], axis=1)
    if label is not None and label_values is not None:
        out["y"] = label_values
    for name, values in columns.items():
        if name not in features and name != label:
            out[name] = values
    return out


class LabelEncoder:
    """String labels → class indices in order of first appearance (deterministic per input)."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        self._index = {c: i for i, c in enumerate(classes)}

    def encode(self, values: np.ndarray) -> np.ndarray:
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values.tolist()):
            key = str(v)
            idx = self._index.get(key)
            if idx is None:
                idx = self._index[key] = len(self.classes)
                self.classes.append(key)
            out[i] = idx
        return out


def label_kind(dtype: np.dtype[Any] | str) -> str:
    """How a label column is stored, decided once per job from its type: ``int`` (class ids),
    ``float`` (a regression target) or ``class`` (strings mapped to class ids)."""
    kind = np.dtype(dtype).kind if dtype != "str" else "U"
    return "int" if kind in "iub" else "float" if kind == "f" else "class"


def label_array(values: np.ndarray, kind: str, encoder: LabelEncoder) -> np.ndarray:
    if kind == "int":
        return values.astype(np.int64, copy=False)
    if kind == "float":
        return values.astype(np.float32, copy=False)
    return encoder.encode(values)


def bad_float_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of NaN and of ±inf rows (any element) in a float array."""
    if values.dtype.kind != "f":
        empty = np.zeros(len(values), dtype=bool)
        return empty, empty
    flat = values.reshape(len(values), -1)
    return np.isnan(flat).any(axis=1), np.isinf(flat).any(axis=1)
