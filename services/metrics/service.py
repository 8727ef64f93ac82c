"""Wiring of the metrics service.

For now it joins the mesh with the runtime's own endpoints (status, discovery, health); what it
gathers and serves is added by the metrics issue.
"""

from __future__ import annotations

from shared.service import Service


class MetricsService(Service):
    name = "metrics"
    description = "Gathers metrics and spans, serves Prometheus and the dashboard, drives autoscaling."
