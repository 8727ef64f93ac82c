"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.  A test checks that every
route the app serves is described here and nothing else is."""

from __future__ import annotations

from typing import Any

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def _responses(ok: str, *codes: int, ok_code: int = 200) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok_code): {"description": ok}}
    reasons = {
        400: "invalid request",
        401: "API key missing or unknown",
        403: "scope too small",
        404: "unknown model, version or request",
        413: "body over the limit",
        429: "overloaded; see Retry-After",
        503: "no worker serves it",
        504: "deadline passed",
    }
    for code in codes:
        out[str(code)] = {"description": reasons[code], "content": _ERROR}
    return out


MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def _model_paths(with_version: bool) -> dict[str, Any]:
    base = "/v2/models/{model}" + ("/versions/{version}" if with_version else "")
    params = [MODEL, VERSION] if with_version else [MODEL]
    infer_headers = [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "schema": {"type": "integer"},
            "description": "binary tensor extension: the length of the JSON header before raw tensor bytes",
        },
        {
            "name": "Prefer",
            "in": "header",
            "schema": {"type": "string", "enum": ["respond-async"]},
            "description": "queue a durable request: 202 with Location /v2/results/{id}",
        },
        {
            "name": "Aimesh-Timeout-Ms",
            "in": "header",
            "schema": {"type": "number"},
            "description": "deadline for this request (504 when passed)",
        },
    ]
    return {
        base: {
            "get": {
                "summary": "Model metadata (inputs, outputs)",
                "parameters": params,
                "responses": _responses("metadata", 404),
            }
        },
        f"{base}/ready": {
            "get": {
                "summary": "Whether a worker serves the model",
                "parameters": params,
                "responses": _responses("ready", 503),
            }
        },
        f"{base}/infer": {
            "post": {
                "summary": "Inference (Open Inference Protocol v2, JSON or binary tensors)",
                "parameters": params + infer_headers,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    **_responses(
                        "outputs; header Aimesh-Variant names the version that served",
                        400,
                        401,
                        404,
                        413,
                        429,
                        503,
                        504,
                    ),
                    "202": {"description": "durable request accepted (Prefer: respond-async)"},
                },
            }
        },
    }


def document(version: str) -> dict[str, Any]:
    split_ops = {
        "get": {
            "summary": "A model's traffic split (admin)",
            "parameters": [MODEL],
            "responses": _responses("split", 401, 403, 404),
        },
        "put": {
            "summary": "Set a model's traffic split (admin)",
            "parameters": [MODEL],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Split"}}},
            },
            "responses": _responses("stored", 400, 401, 403, 404),
        },
        "delete": {
            "summary": "Remove a model's split (admin)",
            "parameters": [MODEL],
            "responses": _responses("removed", 401, 403, ok_code=204),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aimesh gateway",
            "version": version,
            "description": "Open Inference Protocol v2 and OpenAI-compatible completions over NATS.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Tensor": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {
                            "type": "string",
                            "enum": [
                                "BOOL",
                                "UINT8",
                                "UINT16",
                                "UINT32",
                                "UINT64",
                                "INT8",
                                "INT16",
                                "INT32",
                                "INT64",
                                "FP16",
                                "FP32",
                                "FP64",
                            ],
                        },
                        "data": {"type": "array"},
                        "parameters": {"type": "object"},
                    },
                },
                "InferRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                        "parameters": {"type": "object"},
                    },
                },
                "Feedback": {
                    "type": "object",
                    "required": ["id", "model"],
                    "properties": {
                        "id": {"type": "string", "description": "the request id (Aimesh-Request-Id / OIP id)"},
                        "model": {"type": "string"},
                        "reward": {"type": "number", "description": "a reward, or a conversion as 1 / 0"},
                        "variant": {"type": "string", "description": "optional: known from the request"},
                    },
                },
                "Guardrails": {
                    "type": "object",
                    "properties": {
                        "max_error_rate": {"type": ["number", "null"]},
                        "max_p99_ms": {"type": ["number", "null"]},
                        "min_reward_lift": {"type": "number"},
                        "min_samples": {"type": "integer"},
                        "min_requests": {"type": "integer"},
                        "alpha": {"type": "number"},
                        "auto": {"type": "boolean"},
                    },
                },
                "Split": {
                    "type": "object",
                    "required": ["model", "variants"],
                    "properties": {
                        "model": {"type": "string"},
                        "control": {"type": "string", "description": "the baseline variant (default: the first)"},
                        "guardrails": {"oneOf": [{"$ref": "#/components/schemas/Guardrails"}, {"type": "null"}]},
                        "state": {"type": "string", "enum": ["running", "promoted", "rolled_back"]},
                        "sticky": {"type": ["string", "null"]},
                        "variants": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"version": {"type": "string"}, "weight": {"type": "number"}},
                            },
                        },
                        "mirrors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"version": {"type": "string"}, "percent": {"type": "number"}},
                            },
                        },
                    },
                },
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": {
            "/openapi.json": {"get": {"summary": "This document", "responses": _responses("OpenAPI 3.1")}},
            "/v2/health/live": {"get": {"summary": "Liveness", "responses": _responses("live")}},
            "/v2/health/ready": {"get": {"summary": "Readiness", "responses": _responses("ready", 503)}},
            "/v2": {"get": {"summary": "Server metadata", "responses": _responses("metadata")}},
            **_model_paths(False),
            **_model_paths(True),
            "/v2/results/{id}": {
                "get": {
                    "summary": "A durable request's result",
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {**_responses("outputs", 400, 404), "202": {"description": "still pending"}},
                }
            },
            "/admin/splits/{model}": split_ops,
            "/v1/feedback": {
                "post": {
                    "summary": "Record an outcome (reward or conversion) for a served request id",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Feedback"}}},
                    },
                    "responses": _responses("stored", 400, 401, 404, ok_code=202),
                }
            },
            "/v1/models": {"get": {"summary": "Language models (OpenAI-compatible)", "responses": _responses("list")}},
            "/v1/completions": {
                "post": {
                    "summary": "Completions (OpenAI-compatible; stream: true sends server-sent events)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["model", "prompt"],
                                    "properties": {
                                        "model": {"type": "string"},
                                        "prompt": {"type": "string"},
                                        "max_tokens": {"type": "integer"},
                                        "temperature": {"type": "number"},
                                        "top_p": {"type": "number"},
                                        "top_k": {"type": "integer"},
                                        "stop": {"type": ["string", "array"]},
                                        "stream": {"type": "boolean"},
                                        "seed": {"type": "integer"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("completion", 400, 404, 503, 504),
                }
            },
        },
    }
