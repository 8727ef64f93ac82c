"""The mesh's services, one package each; each runs as ``python -m services.<name>``.

Services depend on ``shared`` only, never on each other: they talk over NATS.
"""

SERVICE_NAMES = ("ingest", "trainer", "inference", "router", "metrics")
