"""The Open Inference Protocol v2 body formats (pure: bytes and numpy, no HTTP, no NATS).

JSON tensors are ``{"name", "shape", "datatype", "data"}``.  The binary tensor data extension
(which Triton's clients use by default) sends a JSON header of ``Inference-Header-Content-Length``
bytes followed by each binary tensor's raw little-endian bytes, in order, each tensor saying its
size in ``parameters.binary_data_size``.  Binary tensors become arrays with ``np.frombuffer``, no
per-value work.

Outputs: JSON has no NaN or infinities (and msgspec would write ``null``), so in JSON outputs a
non-finite float is the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (the spelling of
protobuf's JSON mapping); binary outputs carry IEEE values as they are.  ``BYTES`` tensors (class
names) are lists of strings in JSON and, in binary, each element's 4-byte little-endian length
followed by its UTF-8 bytes (as Triton does).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from services.router.edge import decode
from shared.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**63 - 1  # OIP dimensions are unsigned; numpy's are int64
MAX_RANK = 32  # numpy's limit on dimensions (at least 32 in every numpy)

DATATYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
BY_DTYPE = {v: k for k, v in DATATYPES.items()}


class TensorIn(msgspec.Struct, kw_only=True):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] = {}


class OutputWanted(msgspec.Struct, kw_only=True):
    name: str
    parameters: dict[str, Any] = {}


class InferBody(msgspec.Struct, kw_only=True):
    id: str = ""
    inputs: list[TensorIn]
    outputs: list[OutputWanted] = []
    parameters: dict[str, Any] = {}


_body = msgspec.json.Decoder(InferBody)


def parse_request(raw: bytes, header_length: int | None) -> tuple[InferBody, dict[str, np.ndarray]]:
    """The request and its input arrays; a 400 naming the problem for anything malformed."""
    if header_length is not None and header_length < 0:
        raise BadRequest(f"{HEADER_LENGTH} must not be negative (got {header_length})")
    header, rest = (raw[:header_length], raw[header_length:]) if header_length is not None else (raw, b"")
    if header_length is not None and header_length > len(raw):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length} but the body has {len(raw)} bytes")
    body = decode(_body, header, "inference request")
    arrays: dict[str, np.ndarray] = {}
    blobs = memoryview(rest)  # sliced without copies
    offset = 0
    for tensor in body.inputs:
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise BadRequest(f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
        count = element_count(tensor)
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            arrays[tensor.name] = _binary_input(tensor, dtype, count, size, blobs[offset:])
            offset += size
        else:
            arrays[tensor.name] = _json_input(tensor, dtype, count)
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes of binary data belong to no input")
    return body, arrays


def _binary_input(tensor: TensorIn, dtype: np.dtype[Any], count: int, size: object, rest: memoryview) -> np.ndarray:
    """An input sent as ``size`` bytes at the start of ``rest`` (the binary tensor extension)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(f"input {tensor.name!r}: binary_data_size must be a byte count, not {size!r}")
    if size != count * dtype.itemsize:
        raise BadRequest(f"input {tensor.name!r}: binary_data_size {size} does not fit shape {tensor.shape}")
    if len(rest) < size:
        raise BadRequest(f"input {tensor.name!r}: the body ends before its {size} bytes")
    return _shaped(np.frombuffer(rest[:size], dtype=dtype.newbyteorder("<")), tensor)


def _json_input(tensor: TensorIn, dtype: np.dtype[Any], count: int) -> np.ndarray:
    """An input sent as JSON ``data``."""
    try:
        values = np.asarray(tensor.data, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"input {tensor.name!r}: data is not a list of {tensor.datatype}") from None
    if values.size != count:
        raise BadRequest(f"input {tensor.name!r}: {values.size} values do not fit shape {tensor.shape}")
    return _shaped(values, tensor)


def element_count(tensor: TensorIn) -> int:
    """The number of values ``tensor.shape`` holds, in Python ints (a numpy int64 product of
    ``[2**32, 2**32]`` wraps to 0); 400 for a negative, huge or too long shape."""
    if len(tensor.shape) > MAX_RANK:
        raise BadRequest(f"input {tensor.name!r}: {len(tensor.shape)} dimensions, at most {MAX_RANK}")
    if any(not 0 <= d <= MAX_DIM for d in tensor.shape):
        raise BadRequest(f"input {tensor.name!r}: shape {tensor.shape} must have dimensions between 0 and {MAX_DIM}")
    return math.prod(tensor.shape)


def _shaped(values: np.ndarray, tensor: TensorIn) -> np.ndarray:
    try:
        return values.reshape(tensor.shape)
    except ValueError as exc:  # e.g. [0, 2**62, 4]: no values, but numpy refuses the shape
        raise BadRequest(f"input {tensor.name!r}: shape {tensor.shape} is not usable: {exc}") from None


def encode_response(
    *, model: str, version: str, request_id: str, outputs: dict[str, np.ndarray], binary: set[str] | bool
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when any output is binary."""
    described = []
    blobs = []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array)
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype(array.dtype)}
        if binary is True or (isinstance(binary, set) and name in binary):
            data = _binary(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = json_values(array)
        described.append(entry)
    header = msgspec.json.encode(
        {"model_name": model, "model_version": version, "id": request_id, "outputs": described}
    )
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def datatype(dtype: np.dtype) -> str:
    """The OIP datatype of an output: BYTES for strings, else by :data:`DATATYPES`."""
    if dtype.kind in "OSU":
        return "BYTES"
    return BY_DTYPE.get(dtype, "FP32")


NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_values(array: np.ndarray) -> list[Any]:
    """The flat values of ``array`` for JSON: floats as they are when all are finite (one
    vectorized check, no per-value work), else with NaN and infinities spelled as strings."""
    flat = array.reshape(-1)
    if flat.dtype.kind != "f":
        return flat.tolist()
    finite = np.isfinite(flat)
    if finite.all():
        return flat.tolist()
    values = flat.astype(object)
    bad = ~finite
    values[bad] = [NON_FINITE[str(v)] for v in flat[bad].astype(np.float64)]
    return values.tolist()


def _binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OSU":  # BYTES: each element's uint32 LE length, then its UTF-8 bytes
        parts = []
        for value in array.reshape(-1).tolist():
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def class_labels(classes: np.ndarray, names: list[str]) -> np.ndarray:
    """Class ids → their names (an object array of str, shaped like ``classes``); an id beyond
    ``names`` is its number spelled out."""
    table = np.array([*names, ""], dtype=object)  # one spare slot: never an empty lookup
    ids = np.asarray(classes, dtype=np.int64)
    labels = table[np.clip(ids, 0, len(names))]
    outside = (ids < 0) | (ids >= len(names))
    if outside.any():
        labels[outside] = [str(i) for i in ids[outside].tolist()]
    return labels


def binary_outputs(body: InferBody) -> set[str] | bool:
    """Which outputs the client wants as binary data."""
    if body.parameters.get("binary_data_output"):
        return True
    return {o.name for o in body.outputs if o.parameters.get("binary_data")}


def tensor_metadata(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    """A tensor of metadata ``inputs`` / ``outputs``: ``dtype`` a numpy name (or "str"), ``shape``
    one row's (the batch dimension, -1, comes first)."""
    return {"name": name, "datatype": datatype(np.dtype(dtype)), "shape": [-1, *shape]}
