"""JSON Schema fragments of the request fields the bridge's endpoints share.

Each route declares its request fields once, as a dict of field name -> schema built from these
(routes/openai_request.py, routes/stream.py, routes/chats.py): the handler accepts exactly those
names (Params.check_known) and the OpenAPI document publishes those schemas, so the two cannot
drift apart.
"""

from __future__ import annotations

from typing import Any

NUM = {"type": "number"}
INT = {"type": "integer", "minimum": 0}
STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}],
         "description": "Generation stops before any of these strings; they never appear in the output."}
SAMPLING = {
    "temperature": {**NUM, "minimum": 0, "description": "0 = greedy. Default 1.0."},
    "top_p": {**NUM, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {**INT, "description": "0 = off."},
    "min_p": {**NUM, "minimum": 0, "exclusiveMaximum": 1},
    "repetition_penalty": {**NUM, "exclusiveMinimum": 0, "maximum": 10, "description": "1.0 = off."},
    "presence_penalty": {**NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**NUM, "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "description": "Taken modulo 2^64."},
}
MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"], "description": "developer = system."},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                              {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                                          "properties": {"type": {"const": "text"},
                                                                         "text": {"type": "string"}}}}]},
        "name": {"type": "string", "description": "Accepted and ignored."},
    },
}
MODEL: dict[str, Any] = {"type": "string", "description": "Model id or alias; empty or absent = the server's default."}
USER: dict[str, Any] = {"type": "string", "description": "Passed to the server: requests are admitted round-robin "
                                                         "across users."}
IGNORE_EOS: dict[str, Any] = {"type": "boolean", "description": "tokenwire extra: generate past end-of-sequence "
                                                                "until max_tokens (benchmarks)."}
KEEP_ALIVE: dict[str, Any] = {"type": "number", "description": "Seconds the model stays loaded after this request: "
                              "0 unloads it at once, negative keeps it; absent: the server's --keep-alive."}
