"""Tensors on the wire (``schemas.Tensor``) to and from numpy, without per-value work."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shared.errors import BadRequest
from shared.schemas import Tensor


def to_wire(array: np.ndarray) -> Tensor:
    if array.ndim == 0 or not array.flags.c_contiguous:  # ascontiguousarray makes a scalar 1-D
        array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return Tensor(dtype=array.dtype.name, shape=list(array.shape), data=array.tobytes())


def from_wire(tensor: Tensor, name: str = "input") -> np.ndarray:
    """A view of the message bytes as an array; 400 if dtype, shape and size disagree."""
    dtype = _little_endian(tensor.dtype, name)
    shape = tensor.shape
    if any(d < 0 for d in shape):
        raise BadRequest(f"{name}: negative dimension in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no int64 wrap-around
    if expected != len(tensor.data):
        raise BadRequest(f"{name}: shape {shape} of {tensor.dtype} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


_NUMERIC = "biufc"  # numpy kinds: bool, signed, unsigned, float, complex
_DTYPES: dict[str, np.dtype[Any]] = {}  # dtype name → its little-endian dtype, per process


def _little_endian(dtype_name: str, name: str) -> np.dtype[Any]:
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        try:
            dtype = np.dtype(dtype_name).newbyteorder("<")
        except TypeError:
            raise BadRequest(f"{name}: unknown dtype {dtype_name!r}") from None
        if dtype.kind not in _NUMERIC:  # object, strings, dates: not tensors, and not all viewable
            raise BadRequest(f"{name}: dtype {dtype_name!r} is not a number or bool type")
        if len(_DTYPES) < 64:  # names come from messages: the cache stays small whatever they say
            _DTYPES[dtype_name] = dtype
    return dtype
