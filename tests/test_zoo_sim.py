"""The simulation stand-in of zoo.sim: built through the zoo's checks, a fixed time per batch."""

from __future__ import annotations

import time

import pytest
import torch

from shared.errors import BadRequest
from zoo import ModelSpec, build_model
from zoo.artifacts import weights_from_bytes, weights_to_bytes


def test_fixed_time_builds_through_the_zoo_checks_and_sleeps_per_batch() -> None:
    spec = ModelSpec(factory="zoo.sim:fixed_time", kwargs={"inputs": 4, "outputs": 3, "device_ms": 30})
    model = build_model(spec)
    # No weights: the empty state survives the safetensors round trip an inference worker makes.
    model.load_state_dict(weights_from_bytes(weights_to_bytes(model.state_dict())))
    for batch in (1, 16):
        start = time.perf_counter()
        out = model(torch.ones(batch, 4))
        elapsed = time.perf_counter() - start
        assert out.shape == (batch, 3) and out.dtype == torch.float32 and not out.any()
        assert 0.029 <= elapsed < 0.5, f"a batch of {batch} took {elapsed * 1e3:.1f} ms, not about 30"


def test_fixed_time_refuses_bad_arguments() -> None:
    cases = [
        ({"inputs": 4, "outputs": 3, "device_ms": -1}, r"device_ms must be a number in \[0, 10000\]"),
        ({"inputs": 4, "outputs": 3, "device_ms": True}, "device_ms must be a number"),
        ({"inputs": 0, "outputs": 3}, "inputs must be between 1 and"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadRequest, match=message):
            build_model(ModelSpec(factory="zoo.sim:fixed_time", kwargs=kwargs))
    model = build_model(ModelSpec(factory="zoo.sim:fixed_time", kwargs={"inputs": 4, "outputs": 3, "device_ms": 0}))
    with pytest.raises(ValueError, match="expected 4 input features per row, got 5"):
        model(torch.ones(2, 5))
