"""Small builders shared by the bridge's OpenAPI documents."""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _request(fields: dict[str, Any], *required: str, **extra: Any) -> dict[str, Any]:
    """A request body's schema: exactly `fields`, and, as the handlers read them (bridge/params.py),
    JSON null in an optional field means "not given", so each optional field also takes null."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, **extra}
    if required:
        out["required"] = list(required)
    out["properties"] = {name: schema if name in required else _nullable(schema) for name, schema in fields.items()}
    return out


# The caller's request id (echoed in X-Request-Id and the server's log); any other value is replaced.
REQUEST_ID_HEADER: dict[str, Any] = {
    "name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "Your id for the request when it matches ^[A-Za-z0-9._:-]{1,64}$; otherwise the bridge "
                   "chooses one. Either way it comes back in the X-Request-Id response header."}


def sse_event(*names: str, data: str = "JSON") -> dict[str, Any]:
    """The schema of one server-sent event (OpenAPI 3.1 reads a text/event-stream schema as one
    event: its `event` name and its `data`); `names` are the event names the stream uses."""
    event = {"enum": list(names)} if len(names) > 1 else {"const": names[0]}
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": event, "data": {"type": "string", "description": data},
        "id": {"type": "string"}, "retry": {"type": "integer"}}}
