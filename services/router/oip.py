"""The Open Inference Protocol v2 body formats (pure: bytes and numpy, no HTTP, no NATS).

JSON tensors are ``{"name", "shape", "datatype", "data"}``.  The binary tensor data extension
(which Triton's clients use by default) sends a JSON header of ``Inference-Header-Content-Length``
bytes followed by each binary tensor's raw little-endian bytes, in order, each tensor saying its
size in ``parameters.binary_data_size``.  Binary tensors become arrays with ``np.frombuffer``, no
per-value work.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from shared.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

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
    header, rest = (raw[:header_length], raw[header_length:]) if header_length is not None else (raw, b"")
    if header_length is not None and header_length > len(raw):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length} but the body has {len(raw)} bytes")
    try:
        body = _body.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"invalid inference request: {exc}") from None
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in body.inputs:
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise BadRequest(f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
        count = int(np.prod(tensor.shape, dtype=np.int64)) if tensor.shape else 1
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if size != count * dtype.itemsize:
                raise BadRequest(f"input {tensor.name!r}: binary_data_size {size} does not fit shape {tensor.shape}")
            chunk = rest[offset : offset + size]
            if len(chunk) != size:
                raise BadRequest(f"input {tensor.name!r}: the body ends before its {size} bytes")
            arrays[tensor.name] = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(tensor.shape)
            offset += size
        else:
            try:
                values = np.asarray(tensor.data, dtype=dtype)
            except (TypeError, ValueError):
                raise BadRequest(f"input {tensor.name!r}: data is not a list of {tensor.datatype}") from None
            if values.size != count:
                raise BadRequest(f"input {tensor.name!r}: {values.size} values do not fit shape {tensor.shape}")
            arrays[tensor.name] = values.reshape(tensor.shape)
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes of binary data belong to no input")
    return body, arrays


def encode_response(
    *, model: str, version: str, request_id: str, outputs: dict[str, np.ndarray], binary: set[str] | bool
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when any output is binary."""
    described = []
    blobs = []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array)
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(array.shape),
            "datatype": BY_DTYPE.get(array.dtype, "FP32"),
        }
        if binary is True or (isinstance(binary, set) and name in binary):
            data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    header = msgspec.json.encode(
        {"model_name": model, "model_version": version, "id": request_id, "outputs": described}
    )
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def binary_outputs(body: InferBody) -> set[str] | bool:
    """Which outputs the client wants as binary data."""
    if body.parameters.get("binary_data_output"):
        return True
    return {o.name for o in body.outputs if o.parameters.get("binary_data")}


def tensor_metadata(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": BY_DTYPE.get(np.dtype(dtype), "FP32"), "shape": [-1, *shape]}
