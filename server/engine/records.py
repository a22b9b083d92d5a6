"""The records of the request path: who speaks, how a generation ended and what it cost.

`ROLES` are the chat roles a message may have (the chat store checks the same list).

`FinishReason` is how the engine ends a sequence; `ReplyStatus` is how a stored reply ended,
which adds who ended a cancelled one (the client: stopped; a deadline or shutdown: cancelled)
and the two states of a reply not finished (pending, interrupted). `Usage` is carried by the
finished event, the stored reply and the message record alike. Plain data: every layer may
import it (the chat store too). Each outside form (protobuf, OpenAI, the web page) has one
mapping from these, at its edge.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum, StrEnum

ROLES = ("system", "user", "assistant", "tool")  # "tool": a tool's result, answering a call


class FinishReason(Enum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"  # the client went away, a deadline passed, the server stopped
    ERROR = "error"


class ReplyStatus(StrEnum):
    """A stored reply's status; the values are what the database holds."""

    PENDING = "pending"  # being generated
    COMPLETE = "complete"
    LENGTH = "length"
    STOPPED = "stopped"  # the user stopped it (StopReply; a call cancelled before its reply began)
    CANCELLED = "cancelled"  # a deadline, nobody watching it (--detached-reply-s) or the server ended it
    ERROR = "error"
    INTERRUPTED = "interrupted"  # the server died while it was pending

    @property
    def finished(self) -> bool:
        return self not in (ReplyStatus.PENDING, ReplyStatus.INTERRUPTED)

    @classmethod
    def of(cls, reason: FinishReason, cancelled_as: ReplyStatus | None = None) -> ReplyStatus:
        """The stored status of a generation that ended for `reason`; a cancelled one is
        `cancelled_as` (who ended it: STOPPED or CANCELLED)."""
        if reason is FinishReason.CANCELLED:
            return cancelled_as or cls.CANCELLED
        return {FinishReason.STOP: cls.COMPLETE, FinishReason.LENGTH: cls.LENGTH, FinishReason.ERROR: cls.ERROR}[reason]


@dataclass(frozen=True)
class Usage:
    """Tokens and timings of one generation (all times from when the server received it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    time_to_first_token_ms: float = 0.0
    decode_tokens_per_second: float = 0.0  # tokens after the first over the time they took
    total_time_ms: float = 0.0
    queue_time_ms: float = 0.0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
