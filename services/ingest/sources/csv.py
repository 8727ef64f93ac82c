"""CSV: a header row, then records; parsed columnar by pyarrow, several chunks at once.

The file is cut into ~4 MiB chunks at record boundaries (a newline outside quotes), each parsed by
``pyarrow.csv`` in a worker thread with the column types fixed from the first chunk (or the given
schema), so the GIL is free while parsing and the chunks' results come back in order.

Bad records never stop the job; each becomes a reject with its line number:

- a wrong number of fields (pyarrow's invalid-row handler);
- a value that does not parse as its column's type: the chunk is re-read as text and checked
  value by value (the slow path runs only for chunks that need it);
- a missing value, NaN or ±inf in a numeric column, a text value over ``max_text_bytes``;
- a line that is not UTF-8 (binary data): it is taken out before pyarrow sees the chunk.

Line numbers count physical lines; a quoted field spanning lines shifts the ones after it.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from services.ingest.printable import quoted
from services.ingest.sources.common import (
    Block,
    LabelEncoder,
    RejectLog,
    Source,
    bad_float_rows,
    label_array,
    label_kind,
    pack_features,
)
from shared.errors import BadRequest
from shared.schemas import IngestRequest

CHUNK_BYTES = 4 << 20
LOOKAHEAD = 3  # chunks parsed ahead of the consumer
_NUMERIC = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32()}


class _Parsed:
    __slots__ = ("columns", "end", "label_raw")

    def __init__(self, columns: dict[str, np.ndarray], label_raw: np.ndarray | None, end: int) -> None:
        self.columns = columns
        self.label_raw = label_raw
        self.end = end


class CsvSource(Source):
    format = "csv"

    def __init__(self, paths: list[Path], request: IngestRequest, parse_threads: int = 2) -> None:
        super().__init__(paths, request, parse_threads)
        self._encoder = LabelEncoder(self.label_classes)
        # Fixed by the first file's first chunk (_decide_types); the other files must match.
        self._names: list[str] = []
        self._types: dict[str, pa.DataType] = {}  # every column's: empty until decided
        self._label_kind: str | None = None  # when there is a label column

    def blocks(self, rejects: RejectLog) -> Iterator[Block]:
        done = 0
        for path in self.paths:
            yield from self._file(path, rejects, done)
            done += path.stat().st_size

    # -- one file ----------------------------------------------------------------------------
    def _file(self, path: Path, rejects: RejectLog, bytes_before: int) -> Iterator[Block]:
        with open(path, "rb") as f:
            header = f.readline()
            names = _header_names(header, path)
            chunks = _chunks(f)
            first = next(chunks, None)
            if first is None:
                return
            if not self._types:
                self._decide_types(names, header, _decodable_lines(first[1], 2)[0], path)
            elif names != self._names:
                raise BadRequest(f"{path}: header {names} differs from the first file's {self._names}")
            with ThreadPoolExecutor(max_workers=self.parse_threads, thread_name_prefix="csv") as pool:
                pending: deque[Future[_Parsed]] = deque()
                for line, data, end in _chain(first, chunks):
                    pending.append(pool.submit(self._parse, path, header, line, data, end, rejects))
                    if len(pending) > LOOKAHEAD:
                        yield self._finish(pending.popleft().result(), bytes_before)
                while pending:
                    yield self._finish(pending.popleft().result(), bytes_before)

    def _decide_types(self, names: list[str], header: bytes, sample: bytes, path: Path) -> None:
        """Column types from the schema, else inferred on the first chunk (a column that is
        numeric in 90% of its sample is numeric; the rest will be rejects)."""
        self._names = names
        label, key = self.request.label, self.request.shard_by
        for role, column in (("label", label), ("shard_by", key)):
            if column is not None and column not in names:
                raise BadRequest(f"{path}: no {role} column {column!r} (columns: {', '.join(names)})")
        given = {c.name: c.dtype for c in self.request.schema or []}
        unknown = set(given) - set(names)
        if unknown:
            raise BadRequest(f"schema names columns the file does not have: {', '.join(sorted(unknown))}")
        sample_table = pacsv.read_csv(
            io.BytesIO(header + sample),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=lambda _: "skip"),
        )
        types: dict[str, pa.DataType] = {}
        for name in names:
            if name in given:
                dtype = given[name]
                types[name] = _NUMERIC.get(dtype, pa.string())
                continue
            inferred = sample_table.column(name).type
            kept_as_is = name in (label, key)  # a label or a shard key keeps its type; features are float32
            if pa.types.is_integer(inferred) or pa.types.is_boolean(inferred):
                types[name] = pa.int64() if kept_as_is else pa.float32()
            elif pa.types.is_floating(inferred) or _mostly_numeric(sample_table.column(name)):
                types[name] = pa.float64() if kept_as_is else pa.float32()
            else:
                types[name] = pa.string()
        self._types = types
        self.features = [n for n in names if n not in (label, key) and types[n] != pa.string()]
        if label is not None:
            self._label_kind = label_kind(types[label].to_pandas_dtype() if types[label] != pa.string() else "str")

    # -- one chunk (in a worker thread) --------------------------------------------------------
    def _parse(self, path: Path, header: bytes, line: int, data: bytes, end: int, rejects: RejectLog) -> _Parsed:
        skipped: list[tuple[int, str]] = []  # records with a wrong field count: (line, reason)
        dropped: list[tuple[int, str]] = []  # lines that are not UTF-8, taken out of ``data``
        kept: list[int] | None = None  # physical line of each line left in ``data``, when some were
        if not data.isascii():
            data, kept, dropped = _decodable_lines(data, line)

        def bad_row(row: Any) -> str:
            index = row.number - 2  # the header is row 1
            number = kept[index] if kept is not None else line + index
            skipped.append((number, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
            return "skip"

        parse = pacsv.ParseOptions(invalid_row_handler=bad_row)
        try:
            table = self._read(header + data, parse, self._types)
            text_columns: dict[str, Any] = {}
        except pa.ArrowInvalid:
            # Some value is not of its column's type: re-read this chunk as text, check each value.
            skipped.clear()
            table = self._read(header + data, parse, dict.fromkeys(self._names, pa.string()))
            text_columns = {n: table.column(n) for n in self._names if self._types[n] != pa.string()}
        skipped = sorted(skipped + dropped)
        for number, reason in skipped:
            rejects.add(str(path), number, reason)
        lines = _record_lines(table.num_rows, line, [n for n, _ in skipped])
        keep = np.ones(table.num_rows, dtype=bool)
        columns: dict[str, np.ndarray] = {}
        for name in self._names:

            def reject(mask: np.ndarray, reason: Callable[[int], str], name: str = name) -> None:
                """Log each still-kept row of ``mask`` as rejected, and stop keeping it."""
                for i in np.flatnonzero(mask & keep):
                    rejects.add(str(path), int(lines[i]), reason(int(i)), name)
                keep[mask] = False

            columns[name] = self._column_values(table, text_columns, name, reject)
        if not keep.all():
            columns = {n: v[keep] for n, v in columns.items()}
        label = self.request.label
        label_raw = columns.pop(label) if label is not None else None
        packed = pack_features(columns, self.features, None, None)
        return _Parsed(packed, label_raw, end)

    @staticmethod
    def _read(data: bytes, parse: pacsv.ParseOptions, types: dict[str, Any]) -> pa.Table:
        read = pacsv.ReadOptions(use_threads=False)
        convert = pacsv.ConvertOptions(column_types=types)
        return pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)

    def _column_values(
        self,
        table: pa.Table,
        text_columns: dict[str, Any],
        name: str,
        reject: Callable[[np.ndarray, Callable[[int], str]], None],
    ) -> np.ndarray:
        """Column ``name`` of a parsed chunk as numpy, its unusable values rejected: text that is not
        of the column's type, missing values, text over the size limit, NaN and ±inf."""
        target = self._types[name]
        if name in text_columns:
            text = text_columns[name]
            values, bad = _convert_text(text, target)
            kind = np.dtype(target.to_pandas_dtype()).name

            def why(i: int) -> str:
                raw = text[i].as_py()
                return "missing value" if raw in ("", None) else f"cannot parse {quoted(raw)} as {kind}"

            reject(bad, why)
        else:
            col = table.column(name)
            if col.null_count:
                reject(col.is_null().to_numpy(zero_copy_only=False), lambda _: "missing value")
            values = col.to_numpy(zero_copy_only=False)
        if target == pa.string():
            limit = self.request.max_text_bytes
            reject(
                np.array([len(v) > limit for v in values.tolist()], dtype=bool),
                lambda _: f"text longer than {limit} bytes",
            )
        else:
            nan, inf = bad_float_rows(values)
            reject(nan, lambda _: "NaN is not allowed")
            reject(inf, lambda _: "±inf is not allowed")
        return values

    def _finish(self, parsed: _Parsed, bytes_before: int) -> Block:
        columns = parsed.columns
        if parsed.label_raw is not None:
            assert self._label_kind is not None  # decided with the types when there is a label
            # Label classes are assigned here, in input order, so they are deterministic.
            columns = {**columns, "y": label_array(parsed.label_raw, self._label_kind, self._encoder)}
        return Block(columns, bytes_before + parsed.end)


# -- helpers -------------------------------------------------------------------------------------
def _header_names(header: bytes, path: Path) -> list[str]:
    if not header.strip():
        raise BadRequest(f"{path}: no header row")
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"{path}: the header row is not UTF-8 text ({exc.reason} at byte {exc.start}): is this a CSV file?"
        ) from None
    table = pacsv.read_csv(io.BytesIO(header), read_options=pacsv.ReadOptions(use_threads=False))
    names = list(table.column_names)
    if len(set(names)) != len(names):
        raise BadRequest(f"{path}: duplicate column names in the header")
    return names


def _chunks(f: BinaryIO) -> Iterator[tuple[int, bytes, int]]:
    """(first line number, bytes, offset after) per chunk, cut after a newline outside quotes."""
    line = 2
    while True:
        data = f.read(CHUNK_BYTES)
        if not data:
            return
        if not data.endswith(b"\n"):
            data += f.readline()
        while data.count(b'"') % 2:  # a quoted field spans the cut: take the next line too
            more = f.readline()
            if not more:
                break
            data += more
        yield line, data, f.tell()
        line += data.count(b"\n")


def _chain(first: tuple[int, bytes, int], rest: Iterator[tuple[int, bytes, int]]) -> Iterator[tuple[int, bytes, int]]:
    yield first
    yield from rest


def _decodable_lines(data: bytes, first_line: int) -> tuple[bytes, list[int] | None, list[tuple[int, str]]]:
    """``data`` without its lines that are not UTF-8: (the rest, the physical line of each line
    kept or None when all were, the dropped lines with the reason).  pyarrow would fail the whole
    chunk on one such line."""
    try:
        data.decode("utf-8")
        return data, None, []
    except UnicodeDecodeError:
        pass
    keep: list[bytes] = []
    kept: list[int] = []
    dropped: list[tuple[int, str]] = []
    for i, raw in enumerate(data.split(b"\n")):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            dropped.append((first_line + i, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
            continue
        keep.append(raw)
        kept.append(first_line + i)
    return b"\n".join(keep), kept, dropped


def _record_lines(rows: int, first_line: int, skipped: list[int]) -> np.ndarray:
    """Physical line of each parsed record, given the lines of records skipped before it."""
    lines = first_line + np.arange(rows, dtype=np.int64)
    for number in sorted(skipped):
        lines[lines >= number] += 1
    return lines


def _convert_text(column: Any, target: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """Convert a text column to ``target`` value by value: (values, mask of bad ones)."""
    raw = column.to_pylist()
    dtype = target.to_pandas_dtype()
    out = np.zeros(len(raw), dtype=dtype)
    bad = np.zeros(len(raw), dtype=bool)
    cast = int if np.dtype(dtype).kind == "i" else float
    for i, value in enumerate(raw):
        try:
            out[i] = cast(value)
        except (TypeError, ValueError):
            bad[i] = True
    return out, bad


def _mostly_numeric(column: Any) -> bool:
    values = [v for v in column.to_pylist() if v not in (None, "")]
    if not values:
        return False
    ok = 0
    for v in values:
        try:
            float(v)
            ok += 1
        except (TypeError, ValueError):
            pass
    return ok >= 0.9 * len(values)
