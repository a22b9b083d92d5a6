"""Keyword search helpers: a user's words as an FTS5 query, and snippets as highlighted spans.

Pure functions (no database); chat_store runs the queries.
"""

from __future__ import annotations

import re

# FTS5's snippet() wraps each matched term in these (control characters never typed by people).
MARK_OPEN = "\x02"
MARK_CLOSE = "\x03"
ELLIPSIS = "…"
SNIPPET_TOKENS = 12  # words of context FTS5 keeps around a match

_WORD = re.compile(r"\w+", re.UNICODE)

Span = tuple[str, bool]  # (text, highlighted)


def query_terms(text: str, limit: int = 16) -> list[str]:
    """The words of a search box (punctuation and FTS5 syntax are ignored), each once (case-blind),
    in order: a query of one word repeated costs what the word alone does."""
    seen: dict[str, str] = {}
    for word in _WORD.findall(text):
        seen.setdefault(word.casefold(), word)
    return list(seen.values())[:limit]


def fts_query(terms: list[str]) -> str:
    """An FTS5 MATCH expression: every term must appear; the last one may be a prefix (search as
    you type). Terms are quoted, so nothing the user types is FTS5 syntax."""
    quoted = ['"' + t.replace('"', '""') + '"' for t in terms]
    quoted[-1] += "*"
    return " AND ".join(quoted)


def tsquery(terms: list[str]) -> str:
    """The same query for PostgreSQL's to_tsquery: every term, the last one also as a prefix.
    Each term is a quoted lexeme, so nothing the user types is tsquery syntax."""
    quoted = ["'" + t.replace("\\", "\\\\").replace("'", "''") + "'" for t in terms]
    quoted[-1] += ":*"
    return " & ".join(quoted)


def spans_from_marked(marked: str) -> list[Span]:
    """Splits FTS5 snippet() output into (text, highlighted) pieces, merging neighbours alike."""
    spans: list[Span] = []
    highlighted = False
    for piece in re.split(f"([{MARK_OPEN}{MARK_CLOSE}])", marked):
        if piece == MARK_OPEN:
            highlighted = True
        elif piece == MARK_CLOSE:
            highlighted = False
        elif piece:
            _add(spans, piece, highlighted)
    return spans


def spans_by_scan(content: str, terms: list[str], context_chars: int = 60) -> list[Span]:
    """A snippet without FTS5 (other databases): the text around the first match, every
    occurrence of a term (case-insensitive, prefix for the last) highlighted."""
    if not terms:
        return [(content[: 2 * context_chars], False)]
    pattern = re.compile(
        "|".join([rf"\b{re.escape(t)}\b" for t in terms[:-1]] + [rf"\b{re.escape(terms[-1])}\w*"]),
        re.IGNORECASE | re.UNICODE,
    )
    first = pattern.search(content)
    start = max(0, (first.start() if first else 0) - context_chars)
    end = min(len(content), (first.end() if first else 0) + context_chars)
    window = content[start:end]
    spans: list[Span] = []
    if start > 0:
        _add(spans, ELLIPSIS, False)
    at = 0
    for match in pattern.finditer(window):
        _add(spans, window[at : match.start()], False)
        _add(spans, match.group(0), True)
        at = match.end()
    _add(spans, window[at:], False)
    if end < len(content):
        _add(spans, ELLIPSIS, False)
    return spans


def _add(spans: list[Span], text: str, highlighted: bool) -> None:
    if not text:
        return
    if spans and spans[-1][1] == highlighted:
        spans[-1] = (spans[-1][0] + text, highlighted)
    else:
        spans.append((text, highlighted))
