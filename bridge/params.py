"""Typed reads of JSON request fields, each failing with a 400 that names the field.

JSON `null` counts as "not given" everywhere, as OpenAI's API treats it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import ApiError, invalid_param

_UINT64 = 1 << 64


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class Params:
    """A request body with typed getters; `check_known` refuses fields the endpoint does not know."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def check_known(self, known: Iterable[str]) -> None:
        allowed = set(known)
        for name in self.data:
            if name not in allowed:
                raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name,
                               code="unsupported_parameter")

    def given(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.data.get(name)

    def string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None or isinstance(value, str):
            return value
        raise invalid_param(name, f"{name} must be a string, got {json_type(value)}")

    def boolean(self, name: str) -> bool | None:
        value = self.data.get(name)
        if value is None or isinstance(value, bool):
            return value
        raise invalid_param(name, f"{name} must be true or false, got {json_type(value)}")

    def number(self, name: str, low: float | None = None, high: float | None = None) -> float | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise invalid_param(name, f"{name} must be a number, got {json_type(value)}")
        if low is not None and value < low or high is not None and value > high:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise invalid_param(name, f"{name} must be in [{lo}, {hi}], got {value:g}")
        return float(value)

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_param(name, f"{name} must be an integer, got {json_type(value)}")
        if low is not None and value < low:
            raise invalid_param(name, f"{name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise invalid_param(name, f"{name} must be <= {high}, got {value}")
        return value

    def seed(self, name: str = "seed") -> int | None:
        """Any integer; negative or huge seeds are taken modulo 2**64 (the server's seed is a uint64)."""
        value = self.integer(name)
        return None if value is None else value % _UINT64

    def stop(self, name: str = "stop") -> list[str]:
        value = self.data.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise invalid_param(name, f"{name} must be a string or an array of strings")
