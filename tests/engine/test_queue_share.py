"""A full queue refuses the user who holds most of it, not a newcomer (Security issue, 6): one
user's flood cannot keep everyone else out, and a per-user bound can cap a user's share."""

from __future__ import annotations

import asyncio

import pytest
from fake_engine import FIRST_WORD, FakeEngine, make_tokenizer

from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SequenceHandle
from tokenwire.server.engine.sequence import FinishedEvent, GenerationRequest, RefusedEvent, Sequence


def handle_for(tok, tag: int, user: str) -> SequenceHandle:
    request = GenerationRequest(prompt_ids=[tag, FIRST_WORD, FIRST_WORD + 1], max_tokens=2,
                                sampling=SamplingConfig(temperature=0.0), user=user)
    return SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())


async def last_event(handle: SequenceHandle):
    async def run():
        async for event in handle.events():
            if isinstance(event, FinishedEvent | RefusedEvent):
                return event
    return await asyncio.wait_for(run(), 5)


async def test_the_heaviest_user_gives_way_to_newcomers() -> None:
    tok = make_tokenizer()
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, queue_size=3, prefix_cache_bytes=0), name="fake")
    try:
        engine.hold()
        first = handle_for(tok, 10, "alice")
        scheduler.submit(first)
        await engine.until_parked()  # alice's first request holds the only slot
        flood = [handle_for(tok, 11 + i, "alice") for i in range(3)]
        for h in flood:
            scheduler.submit(h)
        bob, carol = handle_for(tok, 20, "bob"), handle_for(tok, 30, "carol")
        scheduler.submit(bob)  # the queue is full: alice's newest gives way
        scheduler.submit(carol)  # and again
        with pytest.raises(QueueFull):
            scheduler.submit(handle_for(tok, 40, "dave"))  # no one holds more than one: the newcomer waits
        with pytest.raises(QueueFull):
            scheduler.submit(handle_for(tok, 14, "alice"))  # nor may alice take a place back
        engine.release()
        outcomes = [await last_event(h) for h in (first, *flood, bob, carol)]
        kinds = [type(e).__name__ for e in outcomes]
        assert kinds == ["FinishedEvent", "FinishedEvent", "RefusedEvent", "RefusedEvent", "FinishedEvent",
                         "FinishedEvent"]
        refused = outcomes[2].error
        assert isinstance(refused, QueueFull) and "holds the most" in str(refused) and refused.retry_after_s == 1
        assert [e.usage.completion_tokens for e in outcomes if isinstance(e, FinishedEvent)] == [2, 2, 2, 2]
    finally:
        engine.release()
        scheduler.stop()


async def test_a_per_user_bound_caps_a_users_share() -> None:
    tok = make_tokenizer()
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, queue_size=8, max_queued_per_user=2,
                                                  prefix_cache_bytes=0), name="fake")
    try:
        engine.hold()
        scheduler.submit(handle_for(tok, 10, "alice"))
        await engine.until_parked()
        scheduler.submit(handle_for(tok, 11, "alice"))
        scheduler.submit(handle_for(tok, 12, "alice"))
        with pytest.raises(QueueFull, match="at most 2 per user"):
            scheduler.submit(handle_for(tok, 13, "alice"))
        scheduler.submit(handle_for(tok, 20, "bob"))  # others still get in
        assert scheduler.waiting == 3
    finally:
        engine.release()
        scheduler.stop()
