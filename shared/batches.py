"""Record batches: columns of numpy arrays on the wire (MessagePack), opened without copies.

A column's bytes are the array's little-endian C-order buffer, so decoding is
``np.frombuffer(...).reshape(...)`` over the message body: no per-value work, and the arrays
hand straight to ``torch.from_numpy``.  String columns (dtype ``"str"``) travel as a MessagePack
array of strings.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import numpy as np

from shared.schemas import Column, ColumnSpec, RecordBatch

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RecordBatch)
_strings = msgspec.msgpack.Decoder(list[str])

STR = "str"


def column_spec(name: str, values: np.ndarray) -> ColumnSpec:
    dtype = STR if values.dtype.kind in ("U", "O", "S") else values.dtype.name
    return ColumnSpec(name=name, dtype=dtype, shape=list(values.shape[1:]))


def to_column(name: str, values: np.ndarray) -> Column:
    spec = column_spec(name, values)
    if spec.dtype == STR:
        data = _encoder.encode([str(v) for v in values.tolist()])
    else:
        data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
    return Column(name=name, dtype=spec.dtype, shape=spec.shape, data=data)


def encode_batch(
    *, dataset: str, version: str, shard: int, batch: int, offset: int, columns: Mapping[str, np.ndarray]
) -> bytes:
    count = len(next(iter(columns.values()))) if columns else 0
    return _encoder.encode(
        RecordBatch(
            dataset=dataset,
            version=version,
            shard=shard,
            batch=batch,
            offset=offset,
            count=count,
            columns=[to_column(name, values) for name, values in columns.items()],
        )
    )


def decode_batch(body: bytes) -> RecordBatch:
    return _decoder.decode(body)


def column_array(column: Column, count: int) -> np.ndarray:
    """A column as a numpy array of shape ``(count, *shape)``; a view of the message bytes."""
    if column.dtype == STR:
        return np.array(_strings.decode(column.data), dtype=object)
    return np.frombuffer(column.data, dtype=np.dtype(column.dtype).newbyteorder("<")).reshape(count, *column.shape)


def batch_arrays(batch: RecordBatch) -> dict[str, np.ndarray]:
    return {c.name: column_array(c, batch.count) for c in batch.columns}
