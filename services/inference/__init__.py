"""The inference service: Serves model versions from the registry on request queues, with dynamic batching."""
