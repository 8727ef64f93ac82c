"""The inference service: serves model versions from the registry on request queues, with dynamic batching."""
