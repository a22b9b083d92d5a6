"""TextStream's stop-string path on a real, in-memory tokenizer (fast tier).

The tokenizer is a byte-level BPE with no merges (each byte is one token, so a character like é
or 🚀 spans several tokens and DecodeStream answers nothing until it is whole), plus a few added
multi-character tokens to put several characters in one push, and a special "<eos>".
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from tokenwire.server.engine.text_stream import TextStream

WORDS = ["xab", "abE", "ENDx", "abcEND", "STOP", "a🚀", "abab"]


def _make_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(WORDS)
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    return tok


TOK = _make_tokenizer()
EOS = TOK.token_to_id("<eos>")


def byte_ids(text: str) -> list[int]:
    """One token per byte (each character encoded alone, so no added word matches)."""
    return [i for ch in text for i in TOK.encode(ch).ids]


def word(w: str) -> int:
    assert w in WORDS
    return TOK.token_to_id(w)


def pushes(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(i) for i in ids]


def test_the_tokenizer_splits_characters_over_tokens() -> None:
    assert len(byte_ids("é")) == 2 and len(byte_ids("🚀")) == 4 and len(byte_ids("ab")) == 2


def test_without_stop_strings_text_passes_through_whole_characters_only() -> None:
    for stop in (None, [], [""]):
        stream = TextStream(TOK, stop)
        assert pushes(stream, byte_ids("a🚀é")) == ["a", "", "", "", "🚀", "", "é"]
        assert stream.matched_stop is None
        assert stream.flush() == ""


def test_special_tokens_are_skipped() -> None:
    for stop in (None, ["zz"]):
        stream = TextStream(TOK, stop)
        assert pushes(stream, [*byte_ids("hi"), EOS]) == ["h", "i", ""]
        assert stream.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    stream = TextStream(TOK, ["", "Q"])
    assert pushes(stream, byte_ids("ab")) == ["a", "b"]
    assert stream.matched_stop is None
    assert pushes(stream, byte_ids("Q")) == [""]
    assert stream.matched_stop == "Q"


def test_a_multi_token_stop_string_never_leaks_a_prefix() -> None:
    stream = TextStream(TOK, ["END"])
    assert stream.matched_stop is None
    out = pushes(stream, byte_ids("ab END"))
    assert out == ["a", "b", " ", "", "", ""]
    assert stream.matched_stop == "END"
    assert stream.flush() == ""


def test_held_text_is_released_when_the_stop_fails_to_complete() -> None:
    stream = TextStream(TOK, ["END"])
    assert pushes(stream, byte_ids("xENy")) == ["x", "", "", "ENy"]
    assert stream.matched_stop is None
    assert stream.flush() == ""


def test_held_text_is_released_in_part_when_only_its_tail_can_still_match() -> None:
    stream = TextStream(TOK, ["aab"])
    assert pushes(stream, byte_ids("aaa")) == ["", "", "a"]  # "aa" is held: it may still become "aab"
    assert stream.matched_stop is None
    assert pushes(stream, byte_ids("b")) == [""]
    assert stream.matched_stop == "aab"


def test_the_longest_matching_prefix_is_held() -> None:
    stream = TextStream(TOK, ["aaa"])
    assert pushes(stream, byte_ids("xaa")) == ["x", "", ""]
    assert stream.flush() == "aa"
    stream = TextStream(TOK, ["END"])
    assert stream.push(word("abE")) == "ab"  # "abE" ends with "E", not "EN": one character held
    assert stream.flush() == "E"


def test_the_longest_prefix_over_several_stop_strings_is_held() -> None:
    stream = TextStream(TOK, ["ax", "abcd"])
    assert pushes(stream, byte_ids("zabc")) == ["z", "", "", ""]
    assert stream.push(byte_ids("e")[0]) == "abce"
    assert stream.matched_stop is None
    stream = TextStream(TOK, ["abcd", "cx"])  # the second's shorter prefix does not shrink the first's
    assert pushes(stream, byte_ids("zabc")) == ["z", "", "", ""]
    assert stream.flush() == "abc"


def test_flush_releases_held_text_once() -> None:
    stream = TextStream(TOK, ["END"])
    assert pushes(stream, byte_ids("xEN")) == ["x", "", ""]
    assert stream.flush() == "EN"
    assert stream.flush() == ""
    assert stream.matched_stop is None


def test_text_after_a_stop_in_the_same_token_is_dropped() -> None:
    stream = TextStream(TOK, ["a"])
    assert stream.push(word("xab")) == "x"
    assert stream.matched_stop == "a"
    assert stream.flush() == ""


def test_a_stop_completed_by_a_multi_character_token() -> None:
    stream = TextStream(TOK, ["END"])
    assert pushes(stream, [*byte_ids("q"), word("ENDx")]) == ["q", ""]
    assert stream.matched_stop == "END"
    stream = TextStream(TOK, ["END"])
    assert pushes(stream, [*byte_ids("EN"), word("abcEND")]) == ["", "", "ENabc"]
    assert stream.matched_stop == "END"
    assert stream.flush() == ""


def test_a_held_prefix_completed_by_the_next_token() -> None:
    stream = TextStream(TOK, ["bEN"])
    assert stream.push(word("xab")) == "xa"
    assert stream.push(word("ENDx")) == ""  # "b" + "ENDx": the held "b" starts the stop
    assert stream.matched_stop == "bEN"
    assert stream.flush() == ""


def test_the_earliest_stop_wins() -> None:
    stream = TextStream(TOK, ["b", "a"])
    assert stream.push(word("xab")) == "x"
    assert stream.matched_stop == "a"
    stream = TextStream(TOK, ["END", "cE"])
    assert stream.push(word("abcEND")) == "ab"
    assert stream.matched_stop == "cE"


def test_a_stop_occurring_twice_in_one_token_cuts_at_its_first_occurrence() -> None:
    stream = TextStream(TOK, ["b"])
    assert stream.push(word("abab")) == "a"
    assert stream.matched_stop == "b"
    stream = TextStream(TOK, ["ab"])
    assert stream.push(word("xab")) == "x"
    assert stream.flush() == ""
    stream = TextStream(TOK, ["ba"])
    assert stream.push(word("abab")) == "a"


def test_of_stops_starting_at_the_same_place_the_first_listed_is_reported() -> None:
    for stops, matched in ((["ab", "a"], "ab"), (["a", "ab"], "a")):
        stream = TextStream(TOK, stops)
        assert stream.push(word("xab")) == "x"
        assert stream.matched_stop == matched


def test_a_stop_string_of_multi_byte_characters() -> None:
    stream = TextStream(TOK, ["🚀!"])
    assert pushes(stream, byte_ids("é🚀")) == ["", "é", "", "", "", ""]
    assert stream.push(byte_ids("?")[0]) == "🚀?"
    stream = TextStream(TOK, ["🚀"])
    assert pushes(stream, byte_ids("é🚀")) == ["", "é", "", "", "", ""]
    assert stream.matched_stop == "🚀"
    stream = TextStream(TOK, ["🚀"])
    assert stream.push(word("a🚀")) == "a"
    assert stream.matched_stop == "🚀"


@pytest.mark.parametrize("stop", ["STOP", "TO", "P", "ST"])
def test_a_stop_inside_one_token(stop: str) -> None:
    stream = TextStream(TOK, [stop])
    assert stream.push(word("STOP")) == "STOP"[: "STOP".index(stop)]
    assert stream.matched_stop == stop


def test_many_stops_and_a_long_stream_emit_exactly_the_text_before_the_first_match() -> None:
    text = "the quick brown fox jumps over the lazy dog; END here"
    stops = ["lazy cat", "fox!", "END", "jumps under", "dog;!"]
    stream = TextStream(TOK, stops)
    out = []
    for i in byte_ids(text):
        out.append(stream.push(i))
        if stream.matched_stop:
            break
    assert "".join(out) == "the quick brown fox jumps over the lazy dog; "
    assert stream.matched_stop == "END"
    for n in range(1, len(out)):  # after each character: exactly the longest stop prefix is held back
        seen, sent = text[:n], "".join(out[:n])
        held = max((k for s in stops for k in range(len(s)) if seen.endswith(s[:k])), default=0)
        assert sent == seen[: n - held]
