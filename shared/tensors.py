"""Tensors on the wire (``schemas.Tensor``) to and from numpy, without per-value work."""

from __future__ import annotations

import numpy as np

from shared.errors import BadRequest
from shared.schemas import Tensor


def to_wire(array: np.ndarray) -> Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return Tensor(dtype=array.dtype.name, shape=list(array.shape), data=array.tobytes())


def from_wire(tensor: Tensor, name: str = "input") -> np.ndarray:
    """A view of the message bytes as an array; 400 if dtype, shape and size disagree."""
    try:
        dtype = np.dtype(tensor.dtype).newbyteorder("<")
    except TypeError:
        raise BadRequest(f"{name}: unknown dtype {tensor.dtype!r}") from None
    if any(d < 0 for d in tensor.shape):
        raise BadRequest(f"{name}: negative dimension in shape {tensor.shape}")
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(tensor.data):
        raise BadRequest(
            f"{name}: shape {tensor.shape} of {tensor.dtype} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
