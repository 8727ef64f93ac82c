"""A model version loaded for serving: the factory only from trusted packages, weights from
safetensors (never pickle), input checks against the version's recorded input columns, and a
forward pass on numpy batches."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from shared.errors import BadRequest
from shared.schemas import ColumnSpec, ModelVersion
from zoo import ModelSpec, build_model
from zoo.artifacts import weights_from_bytes


class LoadedModel:
    def __init__(self, version: ModelVersion, weights: bytes, packages: Iterable[str] = ()) -> None:
        """Build ``version``'s model and load ``weights``.  The factory must be in ``zoo`` or one of
        ``packages`` (the worker's ``model_packages``): a registry entry naming anything else
        (``os:system``) is a 400 before anything is imported, and the version is not served."""
        self.version = version
        self.module = build_model(ModelSpec(factory=version.factory, kwargs=version.kwargs), packages)
        self.module.load_state_dict(weights_from_bytes(weights))
        self.module.eval()
        # A version registered without its inputs takes one float32 value per row, named x.
        self.inputs = list(version.inputs) or [ColumnSpec(name="x", dtype="float32", shape=[])]
        self.input_name = self.inputs[0].name  # what forward() takes
        self.input_shape = list(self.inputs[0].shape)
        self._dtypes = {c.name: np.dtype(c.dtype) for c in self.inputs}

    def check(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The request's rows for this model, or a 400 naming what does not match: exactly the
        declared inputs (by name), each of its declared datatype (no casts: FP64 sent to an FP32
        model is a client's mistake to hear about) and of shape ``[batch, *declared]``."""
        declared = ", ".join(repr(c.name) for c in self.inputs)
        for name in inputs:
            if all(c.name != name for c in self.inputs):
                raise BadRequest(f"unknown input {name!r}: model {self._label()} declares {declared}")
        for spec in self.inputs:
            if spec.name not in inputs:
                got = ", ".join(map(repr, inputs)) or "none"
                raise BadRequest(f"missing input {spec.name!r}: model {self._label()} declares {declared} (got {got})")
            _check_one(spec, self._dtypes[spec.name], inputs[spec.name])
        rows = inputs[self.input_name]
        if len(rows) == 0:
            raise BadRequest(f"input {self.input_name!r} has no rows")
        return rows

    def _label(self) -> str:
        return f"{self.version.model}@{self.version.version}"

    @torch.inference_mode()
    def forward(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if not rows.flags.writeable:  # a view of the request's bytes: torch wants memory it may own
            rows = rows.copy()
        logits = self.module(torch.from_numpy(np.ascontiguousarray(rows)))
        if self.version.task == "classify":
            return {"logits": logits.numpy(), "class": logits.argmax(-1).numpy()}
        return {"logits": logits.numpy()}


def _check_one(spec: ColumnSpec, want: np.dtype, rows: np.ndarray) -> None:
    if rows.dtype != want:
        raise BadRequest(
            f"input {spec.name!r} must be {oip_datatype(want)} ({want.name}), "
            f"got {oip_datatype(rows.dtype)} ({rows.dtype.name})"
        )
    if rows.ndim == 0 or list(rows.shape[1:]) != list(spec.shape):
        raise BadRequest(
            f"input {spec.name!r} must have shape [batch{''.join(f', {d}' for d in spec.shape)}], "
            f"got {list(rows.shape)}"
        )


def oip_datatype(dtype: np.dtype) -> str:
    """The Open Inference Protocol's name of a numpy dtype (float32 → FP32, int64 → INT64)."""
    kind = {"b": "BOOL", "u": "UINT", "i": "INT", "f": "FP"}.get(dtype.kind)
    if kind is None:
        return "BYTES" if dtype.kind in "OSU" else dtype.name
    return kind if kind == "BOOL" else f"{kind}{dtype.itemsize * 8}"
