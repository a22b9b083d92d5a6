"""Text integrity: whole characters only, stop strings caught across tokens and never leaked."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.server.engine.text_stream import TextStream
from tokenwire.server.engine.tokenizer import TokenizerBundle

SAMPLES = [
    "Emoji: 🚀🔥 and a family 👨‍👩‍👧 plus flags 🇫🇷",
    "Accents: café, naïve, Ångström, São Paulo, Žluťoučký kůň",
    "CJK: 你好，世界！こんにちは世界。안녕하세요",
]


@pytest.fixture(scope="module")
def tok(fp32_dir: Path) -> TokenizerBundle:
    return TokenizerBundle(fp32_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_without_replacement_characters(tok: TokenizerBundle, text: str) -> None:
    ids = tok.encode(text)
    stream = TextStream(tok.tokenizer)
    chunks = [stream.push(i) for i in ids]
    chunks.append(stream.flush())
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert len(ids) > len([c for c in chunks if c]), "some characters span several tokens in this sample"


def test_stop_string_split_over_tokens_never_appears(tok: TokenizerBundle) -> None:
    text = "The answer is 42. END_OF_ANSWER and more text after"
    ids = tok.encode(text)
    stop = "END_OF_ANSWER"
    stop_tokens = [i for i in ids if tok.decode([i]).strip() and tok.decode([i]).strip() in stop]
    assert len(stop_tokens) >= 2, "the stop string must span several tokens for this test to mean anything"
    stream = TextStream(tok.tokenizer, [stop])
    emitted = []
    for i in ids:
        emitted.append(stream.push(i))
        if stream.matched_stop:
            break
    assert stream.matched_stop == stop
    assert "".join(emitted) == "The answer is 42. "
    for n in range(1, len(stop)):
        assert not "".join(emitted).endswith(stop[:n]) or stop[:n] == " "


def test_held_back_text_is_released_when_no_stop_follows(tok: TokenizerBundle) -> None:
    stream = TextStream(tok.tokenizer, ["ENDX"])
    out = [stream.push(i) for i in tok.encode("we reach the END")]
    assert "".join(out) == "we reach the "  # "END" might still become "ENDX"
    assert stream.flush() == "END"
