"""Tensors on the wire: a round trip keeps dtype, shape and values; anything a message can claim
that is not a numeric tensor of the right size is a 400, never an exception from numpy."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import BadRequest
from shared.schemas import Tensor
from shared.tensors import from_wire, to_wire


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],  # not contiguous
        np.array([True, False]),
        np.array(2.5, dtype=np.float64),  # 0-d: sent as shape [1], as before
        np.arange(4, dtype=">i4"),  # big-endian: sent little-endian
    ],
)
def test_a_round_trip_keeps_values(array: np.ndarray) -> None:
    back = from_wire(to_wire(array))
    np.testing.assert_array_equal(back.reshape(array.shape), array)
    assert back.dtype.byteorder in ("<", "=", "|")


@pytest.mark.parametrize(
    ("dtype", "shape", "size", "why"),
    [
        ("object", [1], 8, "not a number or bool type"),
        ("U2", [1], 8, "not a number or bool type"),
        ("datetime64[s]", [1], 8, "not a number or bool type"),
        ("no-such-type", [1], 8, "unknown dtype"),
        ("float32", [-1, 2], 8, "negative dimension"),
        ("float32", [2**32, 2**32], 0, "needs"),  # an int64 product would wrap to 0
        ("float32", [3], 8, "needs 12 bytes, got 8"),
    ],
)
def test_a_tensor_that_does_not_fit_is_a_400(dtype: str, shape: list[int], size: int, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        from_wire(Tensor(dtype=dtype, shape=shape, data=b"\0" * size), "x")
