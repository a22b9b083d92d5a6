"""The grammar mask on the real model's tokenizer (the compatibility issue, item 1): rows sampled
from random logits through the mask always produce output that parses and validates; newlines never
get into a JSON string (llguidance misreads this tokenizer's decoder unless it is normalised); the
mask forbids exactly what would break a regex; EOS is allowed only once the output is complete."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from tokenwire.server.engine.constraints import ConstraintError, OutputConstraint, RowConstraint
from tokenwire.server.engine.tokenizer import TokenizerBundle

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
    "word": {"type": "string", "maxLength": 12}, "kind": {"enum": ["a", "b"]}},
    "required": ["ok", "n", "word", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(int4_dir) -> TokenizerBundle:
    return TokenizerBundle(int4_dir)


def sample_row(tok: TokenizerBundle, constraint: OutputConstraint, seed: int, steps: int = 300) -> tuple[str, bool]:
    row = RowConstraint(constraint.grammar(), tok.grammar)
    rng = np.random.default_rng(seed)
    vocab = tok.tokenizer.get_vocab_size()
    out: list[int] = []
    for _ in range(steps):
        logits = row.mask(rng.standard_normal(vocab).astype(np.float32) * 3)
        token = int(np.argmax(logits))
        assert np.isfinite(logits[token])
        if token in tok.eos_token_ids:
            assert row.accepting, "EOS only once the output is complete"
            break
        row.consume(token)
        out.append(token)
        if row.done:
            break
    return tok.tokenizer.decode(out), row.accepting


def test_sampled_rows_always_validate(tok) -> None:
    constraint = OutputConstraint("json_schema", json.dumps(SCHEMA))
    for seed in range(12):
        text, complete = sample_row(tok, constraint, seed)
        assert complete, text
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
        assert "\n" not in value["word"]


def test_a_regex_row_matches_and_forbids_the_rest(tok) -> None:
    for seed in range(6):
        text, complete = sample_row(tok, OutputConstraint("regex", r"[A-Z]{2}-\d{2}"), seed)
        assert complete and re.fullmatch(r"[A-Z]{2}-\d{2}", text), text
    row = RowConstraint(OutputConstraint("regex", r"\d+").grammar(), tok.grammar)
    logits = row.mask(np.zeros(tok.tokenizer.get_vocab_size(), np.float32))
    allowed = {tok.tokenizer.decode([i]) for i in np.flatnonzero(np.isfinite(logits))}
    # Digits, or single bytes that can begin a multi-byte (Unicode) digit: nothing else.
    assert "7" in allowed and all(t.isdigit() or t == "\ufffd" for t in allowed), sorted(allowed)[:10]
    assert "a" not in allowed and " " not in allowed


def test_choice_and_refusals(tok) -> None:
    text, _ = sample_row(tok, OutputConstraint("choice", json.dumps(["red", "green", "blue (dark)"])), 1)
    assert text in ("red", "green", "blue (dark)")
    for bad in (OutputConstraint("json_schema", "[1"), OutputConstraint("choice", "[]"),
                OutputConstraint("regex", "(")):
        with pytest.raises(ConstraintError):
            RowConstraint(bad.grammar(), tok.grammar)
