"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``: the truth about every
route, status, body and constraint the router enforces.  tests/test_openapi.py checks that every
route the app serves is described and nothing else is; tests/test_fuzz_api.py (schemathesis)
checks that what the live router answers conforms to it.

Errors follow the path's family: OpenAI's error object ``{"error": {"message", "type", "param",
"code"}}`` under ``/v1/`` (except ``/v1/feedback``), ``{"error": "..."}`` elsewhere.  Besides a
route's own statuses, the gate may answer any route: 401 (an API key is needed), 403 (an admin
route without the admin scope), 429 (too many requests in flight, with ``Retry-After``), and for a
route that takes a body 413 (over ``max_body_bytes``, or more than the bus carries) and 408 (the
body did not arrive within ``body_timeout_s``).  Path parameters are subject tokens (letters,
digits, ``-``, ``_``): anything else is a 400 before a handler runs.
"""

from __future__ import annotations

from typing import Any

from services.router.openai import MAX_STOP, MAX_TOKENS
from shared.names import Header

TOKEN = "^[A-Za-z0-9_-]+$"  # shared.names.check_token
_OIP_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_OPENAI_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}

REASONS = {
    400: "invalid request (a path parameter that is not a token, a malformed body or header)",
    401: "API key missing or unknown",
    403: "scope too small",
    404: "unknown model, version or request",
    408: "the request body did not arrive within body_timeout_s (the connection is closed)",
    413: "body over max_body_bytes, or over what the bus carries",
    429: "overloaded; see Retry-After",
    500: "the durable request failed in the worker",
    503: "no worker serves it",
    504: "deadline passed",
}
OPEN = (429,)  # what the gate may answer on a route that needs no key
KEYED = (401, 429)
ADMIN = (401, 403, 429)
BODY = (408, 413)  # a route that reads a body


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _responses(ok: dict[str, Any], *codes: int, openai: bool = False) -> dict[str, Any]:
    """``ok``: the success responses by status; ``codes``: the error statuses, each with the
    family's error body."""
    error = _OPENAI_ERROR if openai else _OIP_ERROR
    out = dict(ok)
    for code in sorted(set(codes)):
        out.setdefault(str(code), {"description": REASONS[code], "content": error})
    return out


def _ok(description: str, schema: dict[str, Any] | None = None, status: int = 200) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = _json(schema)
    return {str(status): response}


def _path(name: str, description: str, example: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": TOKEN}
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
        "example": example,
    }


MODEL = _path("model", "a model name", "digits")
VERSION = _path("version", "a version deployed for the model (404 otherwise)", "1")
REQUEST_ID = _path("id", "a durable request's id", "r1")
LM = _path("model", "a language model's name", "lm")
TIMEOUT = {
    "name": Header.TIMEOUT_MS,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?\s*$"},
    "description": "deadline for this request in milliseconds, positive (at most timeout_s; 504 when passed)",
}

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]

INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}


def _completion(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI completion object (``object`` is ``kind``) whose choices hold ``choice``'s
    properties and a finish reason."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [*choice, "finish_reason"],
                    "properties": {**choice, "finish_reason": {"type": ["string", "null"]}},
                },
            },
            "usage": _ref("Usage"),
        },
    }


MAX_TOKENS_SCHEMA = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS}
# What /v1/completions and /v1/chat/completions both take (services.router.openai.Sampling):
# anything else is a 400 naming it, and so is a value the models cannot honour.
SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "pattern": TOKEN, "description": "a deployed language model (404 otherwise)"},
    "max_tokens": MAX_TOKENS_SCHEMA,
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**63 - 1, "description": "an extension"},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}},
            {"type": "null"},
        ]
    },
    "stream": {"type": "boolean"},
    "stream_options": {
        "description": "only with stream: true",
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"include_usage": {"type": "boolean"}},
            },
            {"type": "null"},
        ],
    },
    "n": {"const": 1},
    "seed": {"oneOf": [INT64, {"type": "null"}]},
    "user": {"type": ["string", "null"]},
    "logprobs": {"enum": [None, False, 0]},
    "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
    "presence_penalty": {"enum": [None, 0]},
    "frequency_penalty": {"enum": [None, 0]},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "additionalProperties": False,
    },
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Tensor": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "maxItems": 32, "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": DATATYPES},
            "data": {"type": "array", "description": "the values, flat or nested, row-major"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
        },
    },
    "OutputTensor": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {
                "type": "string",
                "enum": [*DATATYPES, "BYTES"],
                "description": "BYTES: the class names of output label (asked for by name)",
            },
            "data": {
                "type": "array",
                "description": "flat values; a non-finite float is the string NaN, Infinity or -Infinity",
            },
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": [*DATATYPES, "BYTES"]},
            "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1 first: the batch"},
        },
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^[^\s]+$"},
            "inputs": {"type": "array", "items": _ref("Tensor")},
            "outputs": {
                "type": "array",
                "description": "outputs wanted by name (logits, class, and label: the class names as BYTES)",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                },
            },
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        },
        "example": {
            "id": "r1",
            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}],
            "outputs": [{"name": "class"}],
        },
    },
    "InferResponse": {
        "type": "object",
        "required": ["model_name", "model_version", "id", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("OutputTensor")},
        },
    },
    "DurableAccepted": {
        "type": "object",
        "required": ["id", "state", "model_name", "model_version", "result_url"],
        "properties": {
            "id": {"type": "string"},
            "state": {"const": "pending"},
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "result_url": {"type": "string"},
        },
    },
    "Pending": {
        "type": "object",
        "required": ["id", "state"],
        "properties": {"id": {"type": "string"}, "state": {"const": "pending"}},
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}, "description": "the versions served"},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            "parameters": {
                "type": "object",
                "description": "the version described, its task and dataset; for a classifier its input "
                "columns, label column and class names",
            },
        },
    },
    "ModelReady": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "Feedback": {
        "type": "object",
        "required": ["id", "model"],
        "properties": {
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 256,
                "pattern": r"^[^\s]+$",
                "description": f"the request id ({Header.REQUEST_ID} / OIP id)",
            },
            "model": {"type": "string", "pattern": TOKEN},
            "reward": {"type": "number", "description": "a reward, or a conversion as 1 / 0"},
            "variant": {
                "type": "string",
                "pattern": "^([A-Za-z0-9_-]+)?$",
                "description": "optional: known from the request",
            },
            "ts": {"type": "number"},
        },
        "example": {"id": "r1", "model": "digits", "reward": 1.0},
    },
    "FeedbackAccepted": {
        "type": "object",
        "required": ["id", "model", "accepted"],
        "properties": {"id": {"type": "string"}, "model": {"type": "string"}, "accepted": {"const": True}},
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
            "model": {"type": "string", "pattern": TOKEN, "description": "the path's model"},
            "control": {"type": "string", "description": "the baseline variant (default: the first)"},
            "guardrails": {"oneOf": [_ref("Guardrails"), {"type": "null"}]},
            "sticky": {"type": ["string", "null"], "description": "a header that pins a caller to a variant"},
            # Set by the router and the metrics service: what a request says is ignored.
            "state": {"type": "string", "readOnly": True, "description": "running, promoted or rolled_back"},
            "experiment": {"type": "string", "readOnly": True},
            "updated_at": {"type": "string", "readOnly": True},
            "decided_at": {"type": "string", "readOnly": True},
            "variants": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["version"],
                    "properties": {"version": {"type": "string", "pattern": TOKEN}, "weight": {"type": "number"}},
                },
            },
            "mirrors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["version", "percent"],
                    "properties": {
                        "version": {"type": "string", "pattern": TOKEN},
                        "percent": {"type": "number", "minimum": 0, "maximum": 100},
                    },
                },
            },
        },
        "example": {"model": "digits", "variants": [{"version": "1", "weight": 100}]},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": False,
        "properties": {
            **SAMPLING,
            "prompt": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                ]
            },
            "best_of": {"enum": [None, 1]},
            "echo": {"const": False},
            "suffix": {"type": ["string", "null"], "maxLength": 0},
        },
        "example": {"model": "lm", "prompt": "def main():", "max_tokens": 8, "temperature": 0},
    },
    "Completion": _completion(
        "text_completion",
        {"text": {"type": "string"}, "index": {"type": "integer"}},
    ),
    "ChatMessage": {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {"type": "string", "description": "one of the roles of the model's chat template"},
            "content": {"type": "string"},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": False,
        "properties": {
            **SAMPLING,
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_completion_tokens": MAX_TOKENS_SCHEMA,
            "top_logprobs": {"enum": [None, 0]},
            "response_format": {
                "oneOf": [
                    {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
                    {"type": "null"},
                ]
            },
            "tools": {"type": ["array", "null"], "maxItems": 0},
            "functions": {"type": ["array", "null"], "maxItems": 0},
            "tool_choice": {"enum": [None, "none"]},
            "function_call": {"enum": [None, "none"]},
        },
        "example": {"model": "lm", "messages": [{"role": "user", "content": "def main():"}], "max_tokens": 8},
    },
    "ChatCompletion": _completion(
        "chat.completion",
        {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
            },
        },
    ),
}

_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "a chunk (the completion object with the new text; chat.completion.chunk with "
                    'delta for chat), an {"error": {...}} if generation failed midway, then [DONE]',
                },
                "event": {"type": "string"},
            },
        }
    }
}


def _model_paths(with_version: bool) -> dict[str, Any]:
    base = "/v2/models/{model}" + ("/versions/{version}" if with_version else "")
    params = [MODEL, VERSION] if with_version else [MODEL]
    infer_headers = [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
            "description": "binary tensor extension: the length of the JSON header before raw tensor bytes",
        },
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "respond-async queues a durable request: 202 with Location /v2/results/{id}; other "
            "preferences are ignored (RFC 7240)",
        },
        TIMEOUT,
    ]
    ready = {"description": "whether a worker serves it", "content": _json(_ref("ModelReady"))}
    not_ready = {
        "description": "deployed, not yet served by a worker",
        "content": _json({"oneOf": [_ref("ModelReady"), _ref("Error")]}),
    }
    return {
        base: {
            "get": {
                "summary": "Model metadata (inputs, outputs, the versions served, parameters)",
                "parameters": params,
                "responses": _responses(_ok("metadata", _ref("ModelMetadata")), 400, 404, 503, 504, *KEYED),
            }
        },
        f"{base}/ready": {
            "get": {
                "summary": "Whether a worker serves the model (404 when it is not deployed)",
                "parameters": params,
                "responses": _responses({"200": ready, "503": not_ready}, 400, 404, 504, *KEYED),
            }
        },
        f"{base}/infer": {
            "post": {
                "summary": "Inference (Open Inference Protocol v2, JSON or binary tensors)",
                "parameters": params + infer_headers,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("InferRequest")},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": _responses(
                    {
                        "200": {
                            "description": f"outputs; header {Header.VARIANT} names the version that served",
                            "content": {
                                "application/json": {"schema": _ref("InferResponse")},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        "202": {
                            "description": "durable request accepted (Prefer: respond-async)",
                            "content": _json(_ref("DurableAccepted")),
                        },
                    },
                    400,
                    404,
                    503,
                    504,
                    *KEYED,
                    *BODY,
                ),
            }
        },
    }


def _openai_paths() -> dict[str, Any]:
    def generation(summary: str, request: str, response: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": _json(_ref(request))},
                "responses": _responses(
                    {
                        "200": {
                            "description": "the completion, or (stream: true) server-sent events ending data: [DONE]",
                            "content": {**_json(_ref(response)), **_SSE},
                        }
                    },
                    400,
                    404,
                    503,
                    504,
                    *KEYED,
                    *BODY,
                    openai=True,
                ),
            }
        }

    return {
        "/v1/models": {
            "get": {
                "summary": "Language models (OpenAI-compatible)",
                "responses": _responses(_ok("list", _ref("ModelList")), *KEYED, openai=True),
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One language model (404 model_not_found when it is not deployed)",
                "parameters": [LM],
                "responses": _responses(_ok("the model", _ref("Model")), 400, 404, *KEYED, openai=True),
            }
        },
        "/v1/completions": generation(
            "Completions (OpenAI-compatible; stream: true sends server-sent events)", "CompletionRequest", "Completion"
        ),
        "/v1/chat/completions": generation(
            "Chat completions (OpenAI-compatible; stream: true sends server-sent events)",
            "ChatCompletionRequest",
            "ChatCompletion",
        ),
    }


def document(version: str) -> dict[str, Any]:
    split_ops = {
        "get": {
            "summary": "A model's traffic split (admin)",
            "parameters": [MODEL],
            "responses": _responses(_ok("split", _ref("Split")), 400, 404, *ADMIN),
        },
        "put": {
            "summary": "Set a model's traffic split (admin): every version it names must be registered",
            "parameters": [MODEL],
            "requestBody": {"required": True, "content": _json(_ref("Split"))},
            "responses": _responses(_ok("stored", _ref("Split")), 400, 404, 503, 504, *ADMIN, *BODY),
        },
        "delete": {
            "summary": "Remove a model's split (admin)",
            "parameters": [MODEL],
            "responses": _responses(_ok("removed", status=204), 400, 503, 504, *ADMIN),
        },
    }
    ready = {
        "description": "whether the router serves",
        "content": _json({"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aimesh gateway",
            "version": version,
            "description": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": Header.API_KEY},
            },
            "schemas": SCHEMAS,
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": {
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [{}],
                    "responses": _responses(_ok("OpenAPI 3.1", {"type": "object"}), *OPEN),
                }
            },
            "/v2/health/live": {
                "get": {
                    "summary": "Liveness",
                    "security": [{}],
                    "responses": _responses(
                        _ok("live", {"type": "object", "required": ["live"], "properties": {"live": {"const": True}}}),
                        *OPEN,
                    ),
                }
            },
            "/v2/health/ready": {
                "get": {
                    "summary": "Readiness",
                    "security": [{}],
                    "responses": _responses({"200": ready, "503": ready}, *OPEN),
                }
            },
            "/v2": {
                "get": {
                    "summary": "Server metadata",
                    "responses": _responses(_ok("metadata", _ref("ServerMetadata")), *KEYED),
                }
            },
            **_model_paths(False),
            **_model_paths(True),
            "/v2/results/{id}": {
                "get": {
                    "summary": "A durable request's result (its own error status when it failed)",
                    "parameters": [REQUEST_ID],
                    "responses": _responses(
                        {
                            **_ok("outputs", _ref("InferResponse")),
                            **_ok("still pending; see Retry-After", _ref("Pending"), status=202),
                        },
                        400,
                        404,
                        413,
                        500,
                        503,
                        504,
                        *KEYED,
                    ),
                }
            },
            "/admin/splits/{model}": split_ops,
            "/v1/feedback": {
                "post": {
                    "summary": "Record an outcome (reward or conversion) for a served request id",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                    ],
                    "requestBody": {"required": True, "content": _json(_ref("Feedback"))},
                    "responses": _responses(
                        _ok("stored", _ref("FeedbackAccepted"), status=202), 400, 404, 503, 504, *KEYED, *BODY
                    ),
                }
            },
            **_openai_paths(),
        },
    }
