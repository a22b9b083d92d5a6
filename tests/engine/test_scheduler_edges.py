"""Scheduler details on the fake engine: exact step statistics, the per-user stream limit row by
row, the on_finished hook, wait_idle and SequenceHandle.refuse."""

from __future__ import annotations

import asyncio
import logging

from fake_engine import FakeEngine, expected, outcome, prompt

from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import QueueFull, SequenceHandle, wait_idle
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    RefusedEvent,
    Sequence,
)

TIMEOUT = 5


def request(tag: int, max_tokens: int = 3, user: str = "") -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt(tag), max_tokens=max_tokens,
                             sampling=SamplingConfig(temperature=0.0), user=user)


def submit(scheduler, tok, req, on_finished=None) -> SequenceHandle:
    handle = SequenceHandle(Sequence(req, tok), asyncio.get_running_loop(), on_finished=on_finished)
    scheduler.submit(handle)
    return handle


async def consume(handle: SequenceHandle):
    return await outcome(handle, TIMEOUT)


def steps(engine: FakeEngine) -> list[tuple[int, ...]]:
    return [entry[1] for entry in engine.log if entry[0] == "step"]


async def test_stats_steps_and_batch_size_sum_for_one_sequence(start, tok) -> None:
    scheduler, engine = start()
    tokens, finished = await consume(submit(scheduler, tok, request(10, max_tokens=3)))
    assert tokens == expected(prompt(10), 3)
    assert finished.reason == FinishReason.LENGTH
    await asyncio.to_thread(wait_idle, scheduler, TIMEOUT)
    # The first token comes from the prefill; two decode steps of one row give the other two.
    assert (scheduler.stats.steps, scheduler.stats.batch_size_sum) == (2, 2)
    assert (scheduler.stats.prefill_chunks, scheduler.stats.tokens_generated) == (1, 3)
    assert scheduler.stats.finished == {FinishReason.LENGTH.value: 1}


async def test_stats_for_two_sequences_in_one_batch(start, tok) -> None:
    scheduler, engine = start(prefill_chunk=64)
    engine.hold()
    a = submit(scheduler, tok, request(10, max_tokens=4))
    await engine.until_parked()
    b = submit(scheduler, tok, request(11, max_tokens=4))
    engine.release()
    results = await asyncio.gather(consume(a), consume(b))
    assert [r[0] for r in results] == [expected(prompt(10), 4), expected(prompt(11), 4)]
    assert await asyncio.to_thread(wait_idle, scheduler, TIMEOUT)
    assert steps(engine) == [(10,), (10, 11), (10, 11), (11,)]
    assert (scheduler.stats.steps, scheduler.stats.batch_size_sum) == (4, 6)
    assert scheduler.stats.tokens_generated == 8


async def test_two_streams_per_user_row_by_row(start, tok) -> None:
    scheduler, engine = start(max_batch=4, max_streams_per_user=2, prefill_chunk=64)
    engine.hold()
    a1 = submit(scheduler, tok, request(10, max_tokens=5, user="a"))
    await engine.until_parked()
    handles = [a1] + [submit(scheduler, tok, request(t, max_tokens=5, user=u))
                      for t, u in ((11, "a"), (12, "a"), (13, "b"))]
    engine.release()
    results = await asyncio.gather(*(consume(h) for h in handles))
    for (tokens, _), tag in zip(results, (10, 11, 12, 13), strict=True):
        assert tokens == expected(prompt(tag), 5)
    assert await asyncio.to_thread(wait_idle, scheduler, TIMEOUT)
    rows = steps(engine)
    for row in rows:
        assert len([t for t in row if t in (10, 11, 12)]) <= 2, rows
    # a's third stream (12) starts only once its first (10) has left; b's (13) does not wait.
    # Without the limit it would join at the fourth step: (10, 11, 13, 12).
    assert rows == [(10,), (10, 11), (10, 11, 13), (10, 11, 13), (11, 13, 12), (13, 12), (12,), (12,)]
    assert (scheduler.stats.steps, scheduler.stats.batch_size_sum) == (8, 16)
    assert scheduler._running_per_user == {}


async def test_on_finished_is_called_once_per_sequence_and_a_raising_hook_is_harmless(start, tok, caplog) -> None:
    scheduler, _ = start()
    seen: list[FinishedEvent] = []

    def boom(event: FinishedEvent) -> None:
        seen.append(event)
        raise RuntimeError("hook failed")

    with caplog.at_level(logging.ERROR, logger="tokenwire.scheduler"):
        first = submit(scheduler, tok, request(10, max_tokens=2), on_finished=boom)
        tokens, finished = await consume(first)
        assert tokens == expected(prompt(10), 2)
        assert seen == [finished]
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == ["on_finished hook failed"]
        # The loop goes on: the next request runs, with a hook of its own.
        other: list[FinishedEvent] = []
        tokens, finished2 = await consume(submit(scheduler, tok, request(11, max_tokens=3), on_finished=other.append))
        assert tokens == expected(prompt(11), 3)
        assert other == [finished2] and seen == [finished]
        assert finished2.usage.completion_tokens == 3


async def test_wait_idle(start, tok) -> None:
    scheduler, engine = start()
    assert wait_idle(scheduler, 0.5) is True
    engine.hold()
    handle = submit(scheduler, tok, request(10, max_tokens=2))
    await engine.until_parked()
    assert wait_idle(scheduler, 0.05) is False
    engine.release()
    assert await asyncio.to_thread(wait_idle, scheduler, TIMEOUT) is True
    await consume(handle)


async def test_refuse_ends_the_stream_with_a_refused_event(tok) -> None:
    seen = []
    handle = SequenceHandle(Sequence(request(10), tok), asyncio.get_running_loop(), on_finished=seen.append)
    error = QueueFull(4)
    handle.refuse(error)
    assert handle.sequence.cancelled.is_set()
    tokens, last = await consume(handle)
    assert tokens == [] and isinstance(last, RefusedEvent) and last.error is error
    assert seen == []  # not a FinishedEvent: the hook is not called
