"""The metrics service: gathers the mesh's statistics and serves them to Prometheus."""
