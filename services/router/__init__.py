"""The router: the HTTP gateway (Open Inference Protocol v2, OpenAI-compatible) and A/B splits."""
