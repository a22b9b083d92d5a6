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


async def one_cached_turn(scheduler: Scheduler, tok) -> int:
    """Runs a turn of 20 + 6 tokens to its end; the bytes its KV holds in the prefix cache."""
    first = handle_for(tok, 10, max_tokens=6, length=20)
    scheduler.submit(first)
    await outcome(first)
    await until_idle(scheduler)
    return scheduler.prefix_cache.stats.bytes


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
        cached = await one_cached_turn(scheduler, tok)
        assert cached == engine.kv_bytes_for(25), "the finished turn's KV is cached"
        # 30 tokens need room that only the cached entry holds: it is evicted, the sequence runs.
        second = handle_for(tok, 11, max_tokens=10, length=20)
        scheduler.submit(second)
        tokens, end = await outcome(second)
        assert isinstance(end, FinishedEvent) and tokens == expected(prompt(11, 20), 10)
        assert scheduler.prefix_cache.stats.evictions == 1, "the cached turn made room for the running one"
    finally:
        scheduler.stop()


async def test_a_refused_request_leaves_the_prefix_cache_alone() -> None:
    """Shrinking the cache cannot make a request fit that is bigger than the room: the cache stays."""
    tok, engine = make_tokenizer(), FakeEngine()
    scheduler = scheduler_with_room(engine, 40, prefix_cache_bytes=1 << 20)
    try:
        cached = await one_cached_turn(scheduler, tok)
        assert cached > 0
        too_big = handle_for(tok, 11, max_tokens=1000)
        scheduler.submit(too_big)
        _, refused = await outcome(too_big)
        assert isinstance(refused, RefusedEvent) and isinstance(refused.error, KVBudgetExceeded)
        assert scheduler.prefix_cache.stats.bytes == cached, "a request that cannot fit flushed the cache"
    finally:
        scheduler.stop()


async def test_requests_that_fit_pass_one_waiting_for_room_for_a_while() -> None:
    tok, engine = make_tokenizer(), FakeEngine()
    room = engine.kv_bytes_for(24)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, prefix_cache_bytes=0), name="fake",
                          kv_room=lambda: room)
    try:
        engine.hold()
        running = handle_for(tok, 10, max_tokens=8)  # 12 of the 24 tokens of room
        scheduler.submit(running)
        await engine.until_parked()
        big = SequenceHandle(Sequence(GenerationRequest(prompt_ids=prompt(11), max_tokens=16, user="bob",
                                                        sampling=SamplingConfig(temperature=0.0)), tok),
                             asyncio.get_running_loop())
        small = SequenceHandle(Sequence(GenerationRequest(prompt_ids=prompt(12), max_tokens=4, user="carol",
                                                          sampling=SamplingConfig(temperature=0.0)), tok),
                               asyncio.get_running_loop())
        scheduler.submit(big)  # 20 tokens: waits for the running one
        scheduler.submit(small)  # 8 tokens: fits beside it, so it need not wait behind bob
        engine.release()
        results = [await outcome(h) for h in (running, big, small)]
        assert all(isinstance(end, FinishedEvent) for _, end in results)
        assert results[1][0] == expected(prompt(11), 16)
        order = [entry[1] for entry in engine.log if entry[0] == "prefill"]
        first_seen = [tag for i, tag in enumerate(order) if tag not in order[:i]]
        assert first_seen == [10, 12, 11], "carol's request went ahead of bob's, which ran once room was free"
    finally:
        engine.release()
        scheduler.stop()


async def test_a_failed_step_restarts_the_prompt_being_prefilled() -> None:
    """The reset after a failed step drops every KV: a prompt half prefilled starts again, and its
    tokens are the model's own (not a continuation over KV that is gone)."""
    tok, engine = make_tokenizer(), FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, prefix_cache_bytes=0, prefill_chunk=2), name="fake")
    try:
        failed: list[int] = []

        def fail_once(tokens) -> None:
            if engine.steps == 1 and not failed:
                failed.append(1)
                raise RuntimeError("step failed")

        engine.hooks["step"] = fail_once
        engine.hold()
        running = handle_for(tok, 10, max_tokens=10)
        scheduler.submit(running)
        await engine.until_parked()
        long_prompt = handle_for(tok, 11, max_tokens=4, length=12)  # six chunks: still prefilling at the failure
        scheduler.submit(long_prompt)
        engine.release()
        (_, failed_end), (tokens, end) = await outcome(running), await outcome(long_prompt)
        assert isinstance(failed_end, FinishedEvent) and failed_end.reason.name == "ERROR"
        assert isinstance(end, FinishedEvent) and tokens == expected(prompt(11, 12), 4)
        chunks = [entry[2] for entry in engine.log if entry[0] == "prefill" and entry[1] == 11]
        assert sum(chunks) > 12, "its prefill began again after the reset"
    finally:
        engine.release()
        scheduler.stop()
