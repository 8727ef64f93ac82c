"""Wiring of the ingest service.

For now it joins the mesh with the runtime's own endpoints (status, discovery, health); its
work is added by the issues that build it.
"""

from __future__ import annotations

from shared.service import Service


class IngestService(Service):
    name = "ingest"
    description = "Shards raw data into versioned datasets in JetStream."
