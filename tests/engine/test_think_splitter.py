"""The thinking/reply split of reasoning models' text (server/engine/reasoning.py): the same whole
and piece by piece, blank lines around the tags dropped, prose that merely mentions a tag kept."""

from __future__ import annotations

import pytest

from tokenwire.server.engine.reasoning import (
    ThinkSplitter,
    opens_thinking,
    template_can_stop_thinking,
    template_thinks,
)


def split(text: str, pieces: int | None, inside: bool = False) -> tuple[str, str]:
    splitter, thinking, reply = ThinkSplitter(inside), "", ""
    step = pieces or max(len(text), 1)
    for i in range(0, len(text), step):
        t, r = splitter.feed(text[i:i + step])
        thinking, reply = thinking + t, reply + r
    t, r = splitter.finish()
    return thinking + t, reply + r


@pytest.mark.parametrize(("text", "inside", "expected"), [
    ("<think>\nsky, blue\n\n</think>\n\nYes.", False, ("sky, blue", "Yes.")),
    ("  <think>a\n\nb</think>c", False, ("a\n\nb", "c")),
    ("scattering</think>\n\nBlue.", True, ("scattering", "Blue.")),
    ("Plain. <think>not thinking</think>", False, ("", "Plain. <think>not thinking</think>")),
    ("<think>cut off", False, ("cut off", "")),
    ("<thin", False, ("", "<thin")),
    ("", False, ("", "")),
])
def test_the_split_is_the_same_whole_and_piecewise(text: str, inside: bool, expected: tuple[str, str]) -> None:
    for pieces in (None, 1, 2, 5):
        assert split(text, pieces, inside) == expected, pieces


def test_the_reply_streams_as_it_comes() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>hm") == ("hm", "")
    assert splitter.feed("m</thi") == ("m", "")
    assert splitter.feed("nk>Yes") == ("", "Yes")
    assert splitter.feed(" indeed") == ("", " indeed")


def test_templates_say_whether_and_how_they_think() -> None:
    qwen3 = "{% if enable_thinking is false %}<think>\n\n</think>{% endif %}"
    assert template_thinks(qwen3) and template_can_stop_thinking(qwen3)
    assert template_thinks("{{ '<think>\\n' }}") and not template_can_stop_thinking("{{ '<think>\\n' }}")
    assert not template_thinks("<|im_start|>{{ m.content }}")
    assert opens_thinking("<|im_start|>assistant\n<think>\n") and not opens_thinking("<|im_start|>assistant\n")
