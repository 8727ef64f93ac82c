"""The built-in model zoo, and how any model is named: ``package.module:factory`` plus kwargs.

A factory returns a ``torch.nn.Module``; the trainer and the inference workers both build models
this way (with weights from safetensors, never pickle).  Users plug their own factory by import
path the same way.  This package imports torch; ``shared`` never imports it.
"""

from zoo.spec import ModelSpec, build_model, resolve_factory

__all__ = ["ModelSpec", "build_model", "resolve_factory"]
