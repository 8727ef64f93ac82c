"""Resolving ``package.module:factory`` to a model, only inside trusted packages.

A model's factory and keyword arguments come from the network (a training request, a registry
entry), and importing a module runs its code, and calling an arbitrary callable runs anything:
``os:system`` with ``{"command": "…"}`` is a shell.  So a factory resolves only inside the
*trusted packages*: the built-in ``zoo`` plus those a deployment names in the setting
``model_packages`` (``MeshConfig``; the caller passes them in, this module reads no settings).

In order, and nothing is imported before the first three pass:

1. the path is checked as a string: ``module:attribute``, the module a dotted path of ASCII
   identifiers, the attribute a public identifier (no ``_private``);
2. the module is a trusted package or inside one (``zoo``, ``zoo.lm``; not ``zoo_evil``);
3. the kwargs are plain data: str, int, float (finite), bool, None, and lists and maps (string
   keys) of them, within :data:`MAX_KWARGS_DEPTH` levels and :data:`MAX_KWARGS_VALUES` values;
4. the module is imported, and the attribute must be a callable *defined* in a trusted package:
   a name a trusted module merely imported (``from os import system``) is refused.

Every refusal is a :class:`~shared.errors.BadRequest` saying what was refused and how to trust a
package.  The zoo's own models bound their sizes (``zoo.limits``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import torch

from shared.errors import BadRequest, ConfigError

BUILTIN_PACKAGES = ("zoo",)
SETTING = "model_packages ([mesh] model_packages in aimesh.toml, or AIMESH_MODEL_PACKAGES)"
MAX_PATH = 256  # characters of package.module:function
MAX_KWARGS_DEPTH = 8  # nested lists and maps
MAX_KWARGS_VALUES = 10_000  # every value, nested ones included
MAX_STRING = 4096  # characters of any string, key or value
MAX_INT = 2**63 - 1  # what MessagePack carries
_PLAIN = (str, int, float, bool, type(None), list, dict)


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to build a model: a factory by import path and its keyword arguments."""

    factory: str
    kwargs: dict[str, Any] = {}


def trusted_packages(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """``zoo`` and the configured ``extra`` packages; an entry that is not a package name is a
    :class:`ConfigError` (it could never match, and a typo should not pass silently)."""
    packages = list(BUILTIN_PACKAGES)
    for name in extra:
        if not _dotted(name):
            raise ConfigError(f"{SETTING}: {name!r} is not a package name (dotted identifiers, e.g. mymodels.vision)")
        if name not in packages:
            packages.append(name)
    return tuple(packages)


def check_factory(path: str, packages: Iterable[str] = ()) -> tuple[str, str]:
    """(module, attribute) of ``path`` if it names something in a trusted package; else a 400.

    Pure string checks: nothing is imported.  ``packages`` are the configured extra packages
    (``MeshConfig.model_packages``); ``zoo`` is always trusted."""
    trusted = trusted_packages(packages)
    if not isinstance(path, str) or len(path) > MAX_PATH:
        raise BadRequest(f"model factory must be a string of at most {MAX_PATH} characters")
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise BadRequest(f"model factory {path!r} must look like package.module:function")
    if not _dotted(module):
        raise BadRequest(f"model factory {path!r}: {module!r} is not a dotted module path (identifiers only)")
    if not _identifier(attr) or attr.startswith("_"):
        raise BadRequest(f"model factory {path!r}: {attr!r} must be a public name (an identifier, not _private)")
    if not _inside(module, trusted):
        raise BadRequest(
            f"model factory {path!r} refused: factories are imported only from the trusted packages "
            f"{', '.join(trusted)}; to trust another package, add it to the setting {SETTING} on every "
            "trainer and inference node"
        )
    return module, attr


def check_kwargs(kwargs: object) -> None:
    """Refuse kwargs that are not plain data within bounds, with the offending place named."""
    if type(kwargs) is not dict:
        raise BadRequest(f"model kwargs must be a map of names to values, got {type(kwargs).__name__}")
    for key in kwargs:
        if type(key) is not str or not _identifier(key):
            raise BadRequest(f"model kwargs: {key!r} is not a keyword argument name")
    budget = [MAX_KWARGS_VALUES]
    _check_value(kwargs, "kwargs", 0, budget)


def resolve_factory(path: str, packages: Iterable[str] = ()) -> Callable[..., torch.nn.Module]:
    """The factory ``path`` names, imported only once the path passed :func:`check_factory`."""
    packages = tuple(packages)
    module_name, attr = check_factory(path, packages)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadRequest(f"model factory {path!r}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadRequest(f"model factory {path!r}: {module_name} has no callable {attr!r}")
    defined_in = getattr(factory, "__module__", None)
    if not isinstance(defined_in, str) or not _inside(defined_in, trusted_packages(packages)):
        raise BadRequest(
            f"model factory {path!r} refused: {attr} is defined in {defined_in or 'an unknown module'}, "
            "not in a trusted package (a name a trusted module imports from elsewhere is not trusted)"
        )
    return factory


def build_model(spec: ModelSpec, packages: Iterable[str] = (), *, device: str | None = None) -> torch.nn.Module:
    """Build the model; a refused, failing or wrong factory is a 400 with the reason.

    ``device="meta"`` builds it without allocating its weights (a check that the spec works)."""
    check_kwargs(spec.kwargs)
    factory = resolve_factory(spec.factory, packages)
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            model = factory(**spec.kwargs)
    except Exception as exc:
        raise BadRequest(f"model factory {spec.factory} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise BadRequest(f"model factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _identifier(name: str) -> bool:
    return name.isascii() and name.isidentifier()


def _dotted(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_PATH and all(_identifier(p) for p in name.split("."))


def _inside(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _check_scalar(value: object, where: str) -> None:
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise BadRequest(f"model kwargs: {where} is out of the 64-bit integer range")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"model kwargs: {where} must be a finite number")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise BadRequest(f"model kwargs: {where} is longer than {MAX_STRING} characters")


def _check_value(value: object, where: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise BadRequest(f"model kwargs hold more than {MAX_KWARGS_VALUES} values")
    if type(value) not in _PLAIN:  # exact types: no subclass brings its own methods along
        raise BadRequest(
            f"model kwargs: {where} is a {type(value).__name__}; "
            "only strings, numbers, booleans, null, lists and maps are allowed"
        )
    _check_scalar(value, where)
    if isinstance(value, list | dict) and depth >= MAX_KWARGS_DEPTH:
        raise BadRequest(f"model kwargs: {where} is nested deeper than {MAX_KWARGS_DEPTH} levels")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1, budget)
    elif isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str or len(key) > MAX_STRING:
                raise BadRequest(f"model kwargs: {where} has a key that is not a string: {key!r:.40}")
            _check_value(item, f"{where}.{key}", depth + 1, budget)
