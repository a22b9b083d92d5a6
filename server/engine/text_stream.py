"""Token ids in, safe text out: whole characters only, and stop strings never leak.

`tokenizers.decoders.DecodeStream` turns ids into text incrementally and returns nothing
until a character is complete (an emoji or CJK character may span several byte tokens).
On top of that, text that could still become the start of a stop string is held back until
it cannot, so a stop string split over several tokens is caught before any of it is sent.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop = [s for s in (stop or []) if s]
        self._pending = ""
        self.matched_stop: str | None = None

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text now safe to emit (maybe empty).

        After a stop string matched, `matched_stop` is set and the returned text is what came
        before it; the caller ends the generation.
        """
        chunk = self._decoder.step(self._tokenizer, token_id) or ""
        if not self._stop:
            return chunk
        text = self._pending + chunk
        first: tuple[int, str] | None = None
        for s in self._stop:
            at = text.find(s)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, s)
        if first is not None:
            self.matched_stop = first[1]
            self._pending = ""
            return text[: first[0]]
        hold = self._held_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Text held back for a stop string that never came; call when generation ends."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix(self, text: str) -> int:
        return held_suffix(text, self._stop)


def held_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`: text
    that may still become one (a stop string, a tool call's or a thinking block's tag)."""
    best = 0
    for s in markers:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
