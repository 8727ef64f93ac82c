"""Bounds on the zoo's model sizes, checked before anything is allocated.

A model's sizes come from a training request or a registry entry, that is, from the network: an
MLP with ``hidden=[10**9]`` or an LM with ``dim=10**6`` would take every byte of a trainer's or an
inference worker's memory while it is being built.  So every model class and factory of the zoo
checks its sizes here first: each size is an integer in range, and the whole model has at most
:data:`MAX_PARAMETERS` parameters and :data:`MAX_LAYERS` repeated layers.  A refusal is a
``ValueError`` naming the argument, which ``build_model`` reports as a 400.

The limits are constants, not keyword arguments: whoever names the model must not be able to lift
them.  A model that needs more belongs in a package of its own, trusted with ``model_packages``.
"""

from __future__ import annotations

MAX_PARAMETERS = 500_000_000  # 2 GB of float32 weights; about 8 GB per rank to train with Adam
MAX_LAYERS = 256  # hidden layers of an MLP, transformer blocks of an LM
MAX_SIZE = 1 << 24  # any single width, vocabulary, context or channel count


def size(name: str, value: object, *, low: int = 1, high: int = MAX_SIZE) -> int:
    """``value`` as an integer size in [low, high], or a ``ValueError`` naming ``name``."""
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def fraction(name: str, value: object) -> float:
    """A probability such as a dropout rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def parameters(what: str, count: int) -> None:
    """Refuse a model of more than :data:`MAX_PARAMETERS` parameters, before it is built."""
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{what} would have {count:,} parameters, more than the zoo's limit of {MAX_PARAMETERS:,} "
            "(zoo.limits.MAX_PARAMETERS): make it smaller"
        )
