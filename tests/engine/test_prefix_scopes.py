"""The prefix cache is per scope (Security issue, 2): with API keys, a user's prompt reuses only
that user's earlier turns, so neither the time to first token nor the reuse counters can tell
them whether another user's prompt began the same way."""

from __future__ import annotations

import asyncio

import numpy as np
from fake_engine import FIRST_WORD, FakeEngine, expected, make_tokenizer

from tokenwire.server.engine.prefix_cache import PrefixCache
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import Scheduler, SchedulerConfig, SequenceHandle
from tokenwire.server.engine.sequence import FinishedEvent, GenerationRequest, Sequence, TokenEvent

SECRET = [FIRST_WORD + i for i in (4, 1, 7, 3, 9, 2, 8, 5, 6, 0, 4, 4)]


def kv(n: int) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.float32).reshape(1, 1, n, 1)]


def test_lookups_see_only_their_own_scope() -> None:
    cache = PrefixCache(1 << 20, min_match=4)
    cache.store(SECRET, kv(len(SECRET)), scope="alice")
    assert cache.lookup(SECRET + [FIRST_WORD], scope="bob") == (0, None)
    assert cache.lookup(SECRET + [FIRST_WORD], scope="")[0] == 0
    assert cache.lookup(SECRET + [FIRST_WORD], scope="alice")[0] == len(SECRET)
    cache.store(SECRET[:6], kv(6), scope="bob")  # not a prefix of alice's entry: both stay
    assert cache.stats.entries == 2 and cache.lookup(SECRET + [FIRST_WORD], scope="alice")[0] == len(SECRET)


async def run(scheduler: Scheduler, tok, prompt: list[int], scope: str) -> tuple[list[int], FinishedEvent]:
    request = GenerationRequest(prompt_ids=prompt, max_tokens=3, sampling=SamplingConfig(temperature=0.0),
                                user=scope, cache_scope=scope)
    handle = SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())
    scheduler.submit(handle)
    tokens = []
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, FinishedEvent):
            return tokens, event
    raise AssertionError("no finished event")


async def test_another_users_prompt_is_never_reused() -> None:
    tok = make_tokenizer()
    scheduler = Scheduler(FakeEngine(), SchedulerConfig(prefix_cache_bytes=1 << 20), name="fake")
    try:
        _, first = await asyncio.wait_for(run(scheduler, tok, SECRET, "key-user:1"), 5)
        probe = SECRET[:10] + [FIRST_WORD + 11]
        tokens, bob = await asyncio.wait_for(run(scheduler, tok, probe, "key-user:2"), 5)
        assert bob.usage.cached_prompt_tokens == 0, "bob's prompt must not reuse alice's KV"
        assert tokens == expected(probe, 3)
        _, again = await asyncio.wait_for(run(scheduler, tok, probe, "key-user:1"), 5)
        assert again.usage.cached_prompt_tokens == 10, "alice's own turns are still reused"
        assert scheduler.prefix_cache.stats.hits == 1
    finally:
        scheduler.stop()
