"""Wiring of the inference service.

For now it joins the mesh with the runtime's own endpoints (status, discovery, health); its
work is added by the issues that build it.
"""

from __future__ import annotations

from shared.service import Service


class InferenceService(Service):
    name = "inference"
    description = "Serves model versions from the registry on request queues, with dynamic batching."
