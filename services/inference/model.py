"""A model version loaded for serving: the factory only from trusted packages, weights from
safetensors (never pickle), input checks against the version's recorded input columns, and a
forward pass on numpy batches."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from shared.errors import BadRequest
from shared.schemas import ModelVersion
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
        spec = version.inputs[0] if version.inputs else None
        self.input_name = spec.name if spec else "x"
        self.input_dtype = np.dtype(spec.dtype) if spec else np.dtype(np.float32)
        self.input_shape = list(spec.shape) if spec else []

    def check(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The request's rows for this model, or a 400 naming what does not match."""
        if self.input_name in inputs:
            rows = inputs[self.input_name]
        elif len(inputs) == 1:
            rows = next(iter(inputs.values()))
        else:
            raise BadRequest(f"missing input {self.input_name!r} (got {', '.join(inputs) or 'none'})")
        if list(rows.shape[1:]) != self.input_shape:
            raise BadRequest(
                f"input {self.input_name!r} must have shape [batch, {', '.join(map(str, self.input_shape))}], "
                f"got {list(rows.shape)}"
            )
        if rows.dtype != self.input_dtype:
            if rows.dtype.kind not in "iuf" or self.input_dtype.kind not in "iuf":
                raise BadRequest(f"input {self.input_name!r} must be {self.input_dtype.name}, got {rows.dtype.name}")
            rows = rows.astype(self.input_dtype)
        if len(rows) == 0:
            raise BadRequest(f"input {self.input_name!r} has no rows")
        return rows

    @torch.inference_mode()
    def forward(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if not rows.flags.writeable:  # a view of the request's bytes: torch wants memory it may own
            rows = rows.copy()
        logits = self.module(torch.from_numpy(np.ascontiguousarray(rows)))
        if self.version.task == "classify":
            return {"logits": logits.numpy(), "class": logits.argmax(-1).numpy()}
        return {"logits": logits.numpy()}
