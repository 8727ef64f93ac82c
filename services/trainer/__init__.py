"""The trainer service: A training node: coordinates data- and model-parallel PyTorch runs over NATS."""
