"""A reply read whole (as a stored chat keeps it) has the parts its stream sent piece by piece:
the same prose, thinking and calls, with the same call ids."""

from __future__ import annotations

from tokenwire.server.engine.reasoning import ThinkSplitter
from tokenwire.server.engine.reply_shape import ReplyShape
from tokenwire.server.engine.tool_calls import CallOut, ToolCallStream, ToolSpec, call_ids

TOOLS = (ToolSpec("get_weather", "", {"type": "object"}), ToolSpec("get_time", "", {"type": "object"}))
TEXT = ('<think>\nThe user wants two things.\n</think>\n\nLet me check. <tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


def streamed(shape: ReplyShape, text: str, size: int) -> tuple[str, str, list]:
    splitter = ThinkSplitter(inside=shape.thinking == "inside")
    calls = ToolCallStream(shape.tools, call_ids(shape.seed))  # as the stream makes its own
    thinking, prose = [], []
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for piece in [*pieces, None]:
        t, said = splitter.feed(piece) if piece is not None else splitter.finish()
        thinking.append(t)
        parts = calls.feed(said) + (calls.finish() if piece is None else [])
        prose += [p.text for p in parts if not isinstance(p, CallOut)]
    return "".join(prose), "".join(thinking), calls.calls


def test_a_whole_read_matches_the_stream_at_every_chunking() -> None:
    shape = ReplyShape("outside", TOOLS, "seed-1")
    whole = shape.read(TEXT)
    assert whole.reasoning == "The user wants two things."
    assert whole.content.strip() == "Let me check."
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", '{"city": "Paris"}'),
                                                                 ("get_time", "{}")]
    for size in (1, 2, 3, 7, 64):
        assert streamed(shape, TEXT, size) == (whole.content, whole.reasoning, whole.tool_calls), size
    other = ReplyShape("outside", TOOLS, "seed-2").read(TEXT)
    assert [c.id for c in other.tool_calls] != [c.id for c in whole.tool_calls], "ids differ between replies"
    assert len({c.id for c in whole.tool_calls}) == 2


def test_a_reply_still_being_written_holds_back_an_open_call() -> None:
    shape = ReplyShape("", TOOLS, "s")
    cut = TEXT.index("</tool_call>")
    partial = shape.read(TEXT[:cut], final=False)
    assert "<tool_call>" not in partial.content and not partial.tool_calls
    assert ReplyShape().read(TEXT).content == TEXT, "no thinking and no tools: the text as it is"
