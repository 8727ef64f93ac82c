"""The built-in model zoo, and how any model is named: ``package.module:factory`` plus kwargs.

A factory returns a ``torch.nn.Module``; the trainer and the inference workers both build models
this way (with weights from safetensors, never pickle).  Factories resolve only inside trusted
packages: this one, plus those named in the ``model_packages`` setting (see ``zoo.spec``).  This
package imports torch; ``shared`` never imports it.
"""

from zoo.spec import ModelSpec, build_model, check_factory, check_kwargs, resolve_factory, trusted_packages

__all__ = ["ModelSpec", "build_model", "check_factory", "check_kwargs", "resolve_factory", "trusted_packages"]
