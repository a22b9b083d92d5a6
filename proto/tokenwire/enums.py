"""Proto enum values as the short lower-case names people and JSON see (FINISH_REASON_STOP -> "stop")."""

from __future__ import annotations

import re
from typing import Any


def enum_name(enum_type: Any, value: int) -> str:
    """`enum_type` is a generated enum (pb.FinishReason, hpb.MessageStatus, ...): the value's name
    without the type's prefix, lower case; "unknown-N" for a value this client does not know (a
    newer server)."""
    try:
        name = enum_type.Name(value)
    except ValueError:
        return f"unknown-{value}"
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum_type.DESCRIPTOR.name).upper() + "_"
    return name.removeprefix(prefix).lower()
