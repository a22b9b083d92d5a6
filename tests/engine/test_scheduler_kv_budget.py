"""KV counted against the memory budget: the scheduler admits a sequence only when its KV (prompt +
max_tokens) fits in what the budget leaves the model (`kv_room`), lets the prefix cache give way
first, makes it wait while running sequences hold the room, and refuses it when it could never fit.
On the fake engine (tests/fake_engine.py), in milliseconds."""

from __future__ import annotations

import asyncio

from fake_engine import FakeEngine, expected, make_tokenizer, outcome, prompt

from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import KVBudgetExceeded, Scheduler, SchedulerConfig, SequenceHandle
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    GenerationRequest,
    RefusedEvent,
    Sequence,
)


def handle_for(tok, tag: int, max_tokens: int, length: int = 4) -> SequenceHandle:
    request = GenerationRequest(prompt_ids=prompt(tag, length), max_tokens=max_tokens,
                                sampling=SamplingConfig(temperature=0.0))
    return SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())


async def until_idle(scheduler: Scheduler) -> None:
    for _ in range(500):
        if not scheduler.busy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the scheduler is still busy")


def scheduler_with_room(engine: FakeEngine, tokens: int, prefix_cache_bytes: int = 0) -> Scheduler:
    room = engine.kv_bytes_for(tokens)
    return Scheduler(engine, SchedulerConfig(max_batch=4, prefix_cache_bytes=prefix_cache_bytes), name="fake",
                     kv_room=lambda: room)


async def test_a_sequence_waits_until_running_ones_give_their_kv_back() -> None:
    tok, engine = make_tokenizer(), FakeEngine()
    scheduler = scheduler_with_room(engine, 12)  # room for one sequence of 4 + 6 tokens, not two
    try:
        engine.hold()
        first = handle_for(tok, 10, max_tokens=6)
        scheduler.submit(first)
        await engine.until_parked()
        second = handle_for(tok, 11, max_tokens=6)
        scheduler.submit(second)
        engine.release()
        (a, a_end), (b, b_end) = await outcome(first), await outcome(second)
        assert a == expected(prompt(10), 6) and b == expected(prompt(11), 6)
        assert isinstance(a_end, FinishedEvent) and isinstance(b_end, FinishedEvent)
        assert max(engine.batch_sizes) == 1, "the second sequence's KV did not fit beside the first's"
        await until_idle(scheduler)
        assert scheduler._kv_reserved == 0, "every reservation is given back"
    finally:
        engine.release()
        scheduler.stop()


async def test_a_sequence_that_could_never_fit_is_refused_with_the_reason() -> None:
    tok, engine = make_tokenizer(), FakeEngine()
    scheduler = scheduler_with_room(engine, 12)
    try:
        too_big = handle_for(tok, 10, max_tokens=20)
        scheduler.submit(too_big)
        small = handle_for(tok, 11, max_tokens=3)
        scheduler.submit(small)
        tokens, refused = await outcome(too_big)
        assert tokens == [] and isinstance(refused, RefusedEvent)
        assert isinstance(refused.error, KVBudgetExceeded)
        assert "--memory-budget-bytes" in str(refused.error) and "max_tokens 20" in str(refused.error)
        served, done = await outcome(small)
        assert served == expected(prompt(11), 3) and isinstance(done, FinishedEvent)
    finally:
        scheduler.stop()


async def test_the_prefix_cache_gives_way_to_running_sequences() -> None:
    tok, engine = make_tokenizer(), FakeEngine()
    scheduler = scheduler_with_room(engine, 40, prefix_cache_bytes=1 << 20)
    try:
        first = handle_for(tok, 10, max_tokens=6, length=20)
        scheduler.submit(first)
        await outcome(first)
        await until_idle(scheduler)
        cached = scheduler.prefix_cache.stats.bytes
        assert cached == engine.kv_bytes_for(25), "the finished turn's KV is cached"
        # 30 tokens need room that only the cached entry holds: it is evicted, the sequence runs.
        second = handle_for(tok, 11, max_tokens=10, length=20)
        scheduler.submit(second)
        tokens, end = await outcome(second)
        assert isinstance(end, FinishedEvent) and tokens == expected(prompt(11, 20), 10)
        assert scheduler.prefix_cache.stats.evictions == 1, "the cached turn made room for the running one"
    finally:
        scheduler.stop()
