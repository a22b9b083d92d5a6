"""Reasoning models' thinking, kept apart from their answer.

A model whose chat template marks its thinking (`<think>…</think>`, as Qwen3, DeepSeek-R1 and
others do) writes it before its answer; `ThinkSplitter` reads the streamed text and says which part
is thinking and which is the reply, holding back only what may be a tag. When the rendered prompt
already opens the thinking (a template whose generation prompt ends with `<think>`), the reply
starts inside it. Thinking can be turned off per request where the template allows it: the template
is rendered with `enable_thinking=False` (Qwen3's switch).
"""

from __future__ import annotations

import re

from .text_stream import held_suffix

OPEN, CLOSE = "<think>", "</think>"


def template_thinks(template_source: str) -> bool:
    """Whether a chat template marks thinking."""
    return OPEN in template_source or CLOSE in template_source


def template_can_stop_thinking(template_source: str) -> bool:
    """Whether the template takes Qwen3's `enable_thinking` switch."""
    return bool(re.search(r"\benable_thinking\b", template_source))


def opens_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the model inside its thinking (it ends with <think>)."""
    return prompt_text.rstrip().endswith(OPEN)


class ThinkSplitter:
    """feed(text) -> (thinking, reply) that can be said so far; finish() -> the rest."""

    def __init__(self, inside: bool = False) -> None:
        self._inside = inside  # in the thinking now
        self._held = ""  # text that may be the start of a tag
        self._open_allowed = not inside  # a thinking block opens only before any reply text
        self._after_close = False  # the blank lines after </think> are not reply text
        self._after_open = inside  # nor those after <think> thinking

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        thinking = reply = ""
        while self._held:
            if self._inside:
                if self._after_open:
                    self._held = self._held.lstrip("\n")
                    if not self._held:
                        break
                    self._after_open = False
                end = self._held.find(CLOSE)
                if end < 0:  # hold what may be the tag, and new lines that may be the last before it
                    body = self._held[: len(self._held) - held_suffix(self._held, (CLOSE,))]
                    said = body.rstrip("\n")
                    thinking += said
                    self._held = self._held[len(said):]
                    break
                thinking += self._held[:end].rstrip("\n")
                self._held = self._held[end + len(CLOSE):]
                self._inside, self._after_close = False, True
                continue
            if self._after_close:
                self._held = self._held.lstrip("\n")
                if not self._held:
                    break
                self._after_close = False
            if self._open_allowed:
                stripped = self._held.lstrip()
                if stripped.startswith(OPEN):
                    self._held = stripped[len(OPEN):]
                    self._inside, self._open_allowed, self._after_open = True, False, True
                    continue
                if OPEN.startswith(stripped):  # may still become <think>
                    break
                self._open_allowed = False
            reply += self._held
            self._held = ""
        return thinking, reply

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._inside:
            return held, ""  # the reply ended inside its thinking
        return "", held
