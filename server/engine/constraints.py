"""Constrained decoding (structured outputs): the tokens a row may take next, from a grammar.

llguidance computes, for each constrained row at each step, the set of tokens that keep the
output inside the grammar (a JSON Schema, any JSON object, a regex, a choice of strings, a Lark
or GBNF grammar); sampling then only sees those (the others' logits become -inf), so constrained
and free rows share a batch and the scheduler stays one loop. Chosen by measurement against
xgrammar and outlines-core (the closing note of the compatibility work has the figures): every
JSON-Schema feature asked for enforced, unsupported keywords refused loudly, compiles of 1-6 ms,
~30 us a token, numpy only.

The model's tokenizer is read into llguidance once per model (a second or two, on first use).
SmolLM2-style tokenizers whose decoder is Sequence[ByteFallback, ..., ByteLevel] are given their
ByteLevel part alone: llguidance otherwise reads them as SentencePiece vocabularies and allows raw
newlines inside JSON strings.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("tokenwire.engine")
KINDS = ("json_schema", "json_object", "regex", "choice", "lark", "gbnf")


class ConstraintError(ValueError):
    """The constraint cannot be used (not valid, or not supported); the message says why."""


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must match. `text`: the JSON Schema (as JSON), the regex, the Lark or GBNF
    grammar, or the choices as a JSON array of strings; empty for json_object."""

    kind: str
    text: str = ""

    def grammar(self) -> str:
        """The llguidance grammar (raises ConstraintError for a malformed constraint)."""
        import llguidance as llg

        try:
            if self.kind == "json_schema":
                schema = json.loads(self.text)
                if not isinstance(schema, dict | bool):
                    raise ConstraintError("a JSON Schema must be an object")
                return llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
            if self.kind == "json_object":
                return llg.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                             overrides={"whitespace_flexible": False})
            if self.kind == "regex":
                return llg.LLMatcher.grammar_from_regex(self.text)
            if self.kind == "choice":
                choices = json.loads(self.text)
                if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                    raise ConstraintError("choice needs at least one non-empty string")
                return llg.grammar_from("regex", "|".join(_regex_literal(c) for c in choices))
            if self.kind in ("lark", "gbnf"):
                return llg.grammar_from(self.kind, self.text)
        except ConstraintError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"{self.kind}: {exc}") from exc
        raise ConstraintError(f"unknown constraint kind {self.kind!r}; one of {', '.join(KINDS)}")


def _regex_literal(text: str) -> str:
    return "".join("\\" + ch if ch in r"\^$.|?*+()[]{}/" else ch for ch in text)


class GrammarTokenizer:
    """A model's vocabulary as llguidance reads it (built on first use, then shared by its rows)."""

    def __init__(self, tokenizer_json: Path, eos_token_id: int) -> None:
        self._path, self._eos = tokenizer_json, eos_token_id
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    def get(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance as llg

                data = json.loads(Path(self._path).read_text(encoding="utf-8"))
                decoder = data.get("decoder") or {}
                parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
                byte_level = next((p for p in parts if p.get("type") == "ByteLevel"), None)
                if byte_level is not None:
                    data["decoder"] = byte_level
                self._tokenizer = llg.LLTokenizer(json.dumps(data), eos_token=self._eos)
            return self._tokenizer


class RowConstraint:
    """One sequence's matcher: masks its logits before sampling, advances with each token."""

    def __init__(self, grammar: str, tokenizer: GrammarTokenizer) -> None:
        import llguidance as llg
        import llguidance.numpy as llgnp

        self._llgnp = llgnp
        self._tok = tokenizer.get()
        error = llg.LLMatcher.validate_grammar(grammar, self._tok)
        if error:
            raise ConstraintError(error)
        self._matcher = llg.LLMatcher(self._tok, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())
        self._bitmask = llgnp.allocate_token_bitmask(1, self._tok.vocab_size)
        self._vocab = self._tok.vocab_size

    def copy(self) -> RowConstraint:
        """A matcher of the same grammar in the same state, for another row (a request's other choices)."""
        other = object.__new__(RowConstraint)
        other._llgnp, other._tok, other._vocab = self._llgnp, self._tok, self._vocab
        other._matcher = self._matcher.deep_copy()
        other._bitmask = self._llgnp.allocate_token_bitmask(1, self._tok.vocab_size)
        return other

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` [vocab] where every token the grammar forbids next is -inf."""
        self._llgnp.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        allowed = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[: self._vocab].astype(bool)
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        n = min(len(allowed), logits.shape[-1])
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return out

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            log.warning("token %d broke the grammar: %s", token, self._matcher.get_error()[:2000])
            raise ConstraintError(f"token {token} is not allowed by the grammar")

    @property
    def done(self) -> bool:
        """The output is complete and nothing but the end can follow."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())
