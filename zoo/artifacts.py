"""Model weights and training state as safetensors bytes (never pickle).

A checkpoint holds the model's tensors under ``model.<name>``, the optimizer's per-parameter
tensors under ``opt.<index>.<name>``, and everything else (the optimizer's scalar state and
param groups, the data position) as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def weights_to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)


def weights_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


def checkpoint_to_bytes(
    model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, position: dict[str, Any]
) -> bytes:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value.item() if torch.is_tensor(value) else value
    meta = {
        "position": json.dumps(position),
        "opt_scalars": json.dumps(scalars),
        "param_groups": json.dumps(opt["param_groups"]),
    }
    return weights_to_bytes(tensors, meta)


def checkpoint_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state dict, data position)."""
    tensors = st_load(data)
    meta = _metadata(data)
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(meta["opt_scalars"]).items():
        for name, value in values.items():
            state.setdefault(int(index), {})[name] = torch.tensor(value) if name == "step" else value
    optimizer = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return model, optimizer, json.loads(meta["position"])


def _metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__", {}))
