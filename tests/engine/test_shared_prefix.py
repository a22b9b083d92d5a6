"""Operator-marked shared prompts (the Security issue, item 2): with API keys each user's prefix
cache is private, which costs every user the prefill of a system prompt they all send; an
operator may mark such prompts shared (--shared-prefix-file), and then exactly that prefix, and
nothing past it, is reused across users."""

from __future__ import annotations

import asyncio

from fake_engine import FIRST_WORD, FakeEngine, expected, make_tokenizer
from test_prefix_scopes import run

from tokenwire.server.engine.scheduler import SHARED_SCOPE, Scheduler, SchedulerConfig, read_shared_prompts

SYSTEM = [FIRST_WORD + i for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]  # the marked prompt: 10 tokens
SYSTEM_TEXT = " ".join(f"w{t}" for t in SYSTEM)


def scheduler_for(tok, tmp_path, *prompts: str) -> Scheduler:
    path = tmp_path / "shared.txt"
    path.write_text("\n---\n".join(prompts))
    return Scheduler(FakeEngine(), SchedulerConfig(prefix_cache_bytes=1 << 20, shared_prefix_file=str(path)),
                     name="fake", tokenizer=tok)


async def test_a_marked_prompt_is_reused_across_users_and_nothing_past_it(tmp_path) -> None:
    tok = make_tokenizer()
    scheduler = scheduler_for(tok, tmp_path, SYSTEM_TEXT)
    try:
        assert tuple(SYSTEM) in scheduler.shared_prefixes  # as raw text (and as a system message)
        alice = SYSTEM + [FIRST_WORD + 20, FIRST_WORD + 21, FIRST_WORD + 22]
        _, first = await asyncio.wait_for(run(scheduler, tok, alice, "key-user:1"), 5)
        assert first.usage.cached_prompt_tokens == 0
        # Bob shares the marked prompt and even alice's next word: he reuses the prompt only.
        bob = SYSTEM + [FIRST_WORD + 20, FIRST_WORD + 30]
        tokens, second = await asyncio.wait_for(run(scheduler, tok, bob, "key-user:2"), 5)
        assert second.usage.cached_prompt_tokens == len(SYSTEM), "exactly the marked prefix, not alice's word"
        assert tokens == expected(bob, 3), "the shared KV gives the same tokens as a full prefill"
        # Alice's own later turn still reuses her whole turn (her scope beats the shared prefix).
        _, again = await asyncio.wait_for(run(scheduler, tok, alice + [FIRST_WORD + 23], "key-user:1"), 5)
        assert again.usage.cached_prompt_tokens > len(SYSTEM)
        shared = [key for key in scheduler.prefix_cache._entries if key[0] == SHARED_SCOPE]
        assert shared == [(SHARED_SCOPE, tuple(SYSTEM))], "one shared entry: the marked prompt alone"
    finally:
        scheduler.stop()


async def test_an_unmarked_prompt_stays_private(tmp_path) -> None:
    tok = make_tokenizer()
    scheduler = scheduler_for(tok, tmp_path, "w40 w41 w42 w43 w44 w45 w46 w47")  # some other prompt is marked
    try:
        prompt = SYSTEM + [FIRST_WORD + 20]
        await asyncio.wait_for(run(scheduler, tok, prompt, "key-user:1"), 5)
        _, other = await asyncio.wait_for(run(scheduler, tok, prompt, "key-user:2"), 5)
        assert other.usage.cached_prompt_tokens == 0
        assert not [key for key in scheduler.prefix_cache._entries if key[0] == SHARED_SCOPE]
    finally:
        scheduler.stop()


def test_the_shared_prefix_file_is_blocks_between_dashes(tmp_path) -> None:
    path = tmp_path / "shared.txt"
    path.write_text("You are a helpful assistant.\nAnswer briefly.\n---\n\n  Second prompt  \n---\n---\n")
    assert read_shared_prompts(str(path)) == ("You are a helpful assistant.\nAnswer briefly.", "  Second prompt  ")
    assert read_shared_prompts("") == ()
