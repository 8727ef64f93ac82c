"""Resolving ``package.module:factory`` to a model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from shared.errors import BadRequest


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to build a model: a factory by import path and its keyword arguments."""

    factory: str
    kwargs: dict[str, Any] = {}


def resolve_factory(path: str) -> Callable[..., torch.nn.Module]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise BadRequest(f"model factory {path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadRequest(f"model factory {path!r}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadRequest(f"model factory {path!r}: {module_name} has no callable {attr!r}")
    return factory


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model; a factory that raises or returns something else is a 400 with the reason."""
    factory = resolve_factory(spec.factory)
    try:
        model = factory(**spec.kwargs)
    except Exception as exc:
        raise BadRequest(f"model factory {spec.factory} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise BadRequest(f"model factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model
