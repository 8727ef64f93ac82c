"""Wiring of the trainer service.

For now it joins the mesh with the runtime's own endpoints (status, discovery, health); its
work is added by the issues that build it.
"""

from __future__ import annotations

from shared.service import Service


class TrainerService(Service):
    name = "trainer"
    description = "A training node: coordinates data- and model-parallel PyTorch runs over NATS."
