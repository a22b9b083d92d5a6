"""A whole reply read apart the way its stream was: thinking, prose and tool calls.

The stream sends a reply's pieces as they come (ThinkSplitter, then ToolCallStream); a stored chat
keeps the reply in the same parts, read from its whole text when it ends (on the scheduler
thread, also when the client has gone) or as far as it went. Given the same call ids
(`call_ids(seed)`), the calls and their ids are the ones the client was sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import ThinkSplitter
from .tool_calls import CallOut, ToolCallRecord, ToolCallStream, ToolSpec, call_ids


@dataclass
class ShapedReply:
    content: str
    reasoning: str = ""
    tool_calls: list[ToolCallRecord] = field(default_factory=list)


@dataclass
class ReplyShape:
    """How a reply's text is read: `thinking` as GenerationRequest.thinking ("", "inside" or
    "outside"); `tools` the callable tools (None when no call may be made); `seed` the calls' ids'."""

    thinking: str = ""
    tools: tuple[ToolSpec, ...] | None = None
    seed: str = ""

    def calls_stream(self) -> ToolCallStream | None:
        """A reader of this reply's calls (None when no call may be made), with this reply's ids."""
        return ToolCallStream(self.tools, call_ids(self.seed)) if self.tools is not None else None

    def think_splitter(self) -> ThinkSplitter | None:
        """A reader of this reply's thinking (None when its model does not think)."""
        return ThinkSplitter(inside=self.thinking == "inside") if self.thinking else None

    def read(self, text: str, final: bool = True) -> ShapedReply:
        """The reply's parts; not `final`: what could be said so far of a reply still being written."""
        if not self.thinking and self.tools is None:
            return ShapedReply(text)
        reasoning = ""
        splitter = self.think_splitter()
        if splitter is not None:
            reasoning, text = splitter.feed(text)
            if final:
                more_reasoning, rest = splitter.finish()
                reasoning, text = reasoning + more_reasoning, text + rest
        calls = self.calls_stream()
        if calls is None:
            return ShapedReply(text, reasoning)
        parts = calls.feed(text) + (calls.finish() if final else [])
        content = "".join(p.text for p in parts if not isinstance(p, CallOut))
        return ShapedReply(content, reasoning, list(calls.calls))
