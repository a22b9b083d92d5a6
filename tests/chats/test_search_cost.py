"""Search cannot be made to hold a database thread (found by the gRPC fuzzer): FTS5's snippet() is
quadratic in a message's matches, so one long message of one repeated word and a query of that word
16 times took minutes. Snippets are now cut from a bounded window and query words are deduplicated;
this attack answers at once (the bound is generous: the old code took minutes on this machine)."""

from __future__ import annotations

import time

from tokenwire.server.chats.search import query_terms
from tokenwire.server.chats.store import ChatStore


def test_a_long_repeated_word_and_a_repeated_query_answer_at_once(tmp_path) -> None:
    store = ChatStore(str(tmp_path / "chats.db"))
    try:
        user = store.ensure_user("mallory")
        chat = store.create_chat(user)
        store.append_message(user, chat.id, "user", "word " * 24_000)
        started = time.monotonic()
        results = store.search(user, " ".join(["word"] * 16))
        assert time.monotonic() - started < 10
        spans = results[0].snippets[0].spans
        assert ("word", True) in spans and len("".join(t for t, _ in spans)) < 400, "a bounded snippet"
    finally:
        store.close()


def test_query_words_are_deduplicated_in_order() -> None:
    assert query_terms("Word word WORD other word") == ["Word", "other"]
