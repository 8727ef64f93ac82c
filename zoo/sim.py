"""Simulation stand-ins: models whose forward pass takes a fixed time and computes nothing.

:func:`fixed_time` stands in for a GPU kernel in scale benchmarks (``bench/scale.py``): its
forward pass sleeps ``device_ms`` per batch, whatever the batch's size, and answers zeros of the
right shape.  ``time.sleep`` releases the GIL, as a wait on a CUDA stream does, so a worker's CPU
is not what limits it; the sleep is the device time.  It has no parameters (its weights are an
empty safetensors file).  It is not a model to serve for real.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from zoo import limits

MAX_DEVICE_MS = 10_000.0  # one forward pass sleeps at most this long


class FixedTime(nn.Module):
    """Sleeps ``device_ms`` per forward pass, then returns ``(batch, outputs)`` zeros (float32)."""

    def __init__(self, inputs: int, outputs: int, device_ms: float) -> None:
        super().__init__()
        self.inputs = limits.size("inputs", inputs)
        self.outputs = limits.size("outputs", outputs)
        if isinstance(device_ms, bool) or not isinstance(device_ms, int | float) or not 0 <= device_ms <= MAX_DEVICE_MS:
            raise ValueError(f"device_ms must be a number in [0, {MAX_DEVICE_MS:g}], got {device_ms!r}")
        self.device_s = float(device_ms) / 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1)
        if rows.shape[1] != self.inputs:
            raise ValueError(f"expected {self.inputs} input features per row, got {rows.shape[1]}")
        time.sleep(self.device_s)
        return torch.zeros(rows.shape[0], self.outputs)


def fixed_time(*, inputs: int, outputs: int, device_ms: float = 5.0) -> nn.Module:
    """A stand-in whose forward pass takes ``device_ms`` per batch (see the module's docstring)."""
    return FixedTime(inputs, outputs, device_ms)
