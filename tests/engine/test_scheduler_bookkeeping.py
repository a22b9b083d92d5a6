"""The scheduler's bookkeeping that the second mutation run found unpinned, on the fake engine: how
the loop says it died and what it leaves (nothing waiting, nothing running), exact log lines and
error texts, the unload path's queue, per-user counts given back as streams end, places in line told
when a wait begins for a per-user limit and as soon as the line moves, the stats, the shared-prompt
file's blocks, and a sequence that finished before its prefill failed still ending as it finished."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from fake_engine import FakeEngine, expected, prompt

from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import (
    Scheduler,
    SchedulerConfig,
    SchedulerUnavailable,
    SequenceHandle,
    read_shared_prompts,
    wait_idle,
)
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    QueuedEvent,
    Sequence,
    TokenEvent,
)
from tokenwire.server.metrics import Metrics

TIMEOUT = 5


def request(tag: int, max_tokens: int = 3, user: str = "", length: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt(tag, length), max_tokens=max_tokens,
                             sampling=SamplingConfig(temperature=0.0), user=user)


def submit(scheduler: Scheduler, tok, req: GenerationRequest) -> SequenceHandle:
    handle = SequenceHandle(Sequence(req, tok), asyncio.get_running_loop())
    scheduler.submit(handle)
    return handle


async def events(handle: SequenceHandle) -> list:
    async def run() -> list:
        return [e async for e in handle.events()]
    return await asyncio.wait_for(run(), TIMEOUT)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


class FailingMetrics(Metrics):
    """A metrics hook that raises from the scheduler thread (a bug outside the engine)."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def _maybe_fail(self, hook: str) -> None:
        if hook == self.hook and threading.current_thread().name.startswith("scheduler-"):
            raise RuntimeError(f"{hook} broke")

    def queue_length(self, model: str, n: int) -> None:
        if n == 2:  # once two wait
            self._maybe_fail("queue_length")

    def time_to_first_token(self, model: str, seconds: float) -> None:
        self._maybe_fail("time_to_first_token")


class RecordingMetrics(Metrics):
    def __init__(self) -> None:
        self.queue: list[tuple] = []

    def queue_length(self, model: str, n: int) -> None:
        self.queue.append((model, n))


async def test_a_dying_loop_says_so_ends_everyone_and_leaves_nothing_behind(tok, caplog) -> None:
    engine = FakeEngine()
    engine.hold()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, prefix_cache_bytes=0), name="fake",
                          metrics=FailingMetrics("queue_length"))
    try:
        with caplog.at_level(logging.ERROR, logger="tokenwire.scheduler"):
            first = submit(scheduler, tok, request(10))
            await engine.until_parked()
            waiting = [submit(scheduler, tok, request(11)), submit(scheduler, tok, request(12))]
            engine.release()  # the next admission reports two waiting, and that metrics call kills the loop
            for handle in [first, *waiting]:
                finished = (await events(handle))[-1]
                assert isinstance(finished, FinishedEvent) and finished.reason == FinishReason.ERROR
                assert finished.error_message == "internal error: RuntimeError: queue_length broke"
        scheduler._thread.join(TIMEOUT)  # the loop has ended
        assert errors(caplog) == ["scheduler of fake stopped"]
        assert (scheduler.waiting, scheduler.running, scheduler.busy) == (0, 0, False)
        with pytest.raises(SchedulerUnavailable, match="stopped after an internal error: RuntimeError"):
            submit(scheduler, tok, request(13))
    finally:
        scheduler.stop()


async def test_a_failed_decode_step_is_logged_and_named_exactly(start, tok, caplog) -> None:
    scheduler, engine = start()

    def broken(tokens) -> None:
        raise RuntimeError("step broke")

    engine.hooks["step"] = broken
    with caplog.at_level(logging.ERROR, logger="tokenwire.scheduler"):
        finished = (await events(submit(scheduler, tok, request(10, max_tokens=4))))[-1]
    assert finished.reason == FinishReason.ERROR and finished.error_message == "RuntimeError: step broke"
    assert errors(caplog) == ["decode step of fake failed"]


async def test_unloading_ends_the_queue_and_empties_it(start, tok) -> None:
    scheduler, engine = start(max_batch=1)
    engine.hold()
    running = submit(scheduler, tok, request(10, max_tokens=3))
    await engine.until_parked()
    queued = submit(scheduler, tok, request(11))
    stopping = asyncio.get_running_loop().run_in_executor(None, scheduler.stop)
    await asyncio.sleep(0.05)  # stop() has set the flag; the loop is still in the held prefill
    engine.release()
    assert (await events(running))[-1].reason == FinishReason.LENGTH, "a running stream is finished"
    last = (await events(queued))[-1]
    assert last.reason == FinishReason.CANCELLED and last.error_message == "model unloaded"
    await stopping
    assert (scheduler.waiting, scheduler.busy) == (0, False)


async def test_the_stats_count_every_finish_and_every_chunk(start, tok) -> None:
    scheduler, _ = start(prefill_chunk=3)
    for tag in (10, 11):
        await events(submit(scheduler, tok, request(tag, max_tokens=2, length=10)))
    assert await asyncio.to_thread(wait_idle, scheduler, TIMEOUT)
    assert scheduler.stats.finished == {FinishReason.LENGTH.value: 2}
    assert scheduler.stats.prefill_chunks == 8, "10 prompt tokens in chunks of 3, twice"


async def test_a_cancelled_wait_reports_the_queue_by_model(tok) -> None:
    engine, metrics = FakeEngine(), RecordingMetrics()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, prefix_cache_bytes=0), name="m", metrics=metrics)
    try:
        engine.hold()
        running = submit(scheduler, tok, request(10))
        await engine.until_parked()
        queued = submit(scheduler, tok, request(11))
        queued.cancel()
        engine.release()
        assert (await events(queued))[-1].reason == FinishReason.CANCELLED
        await events(running)
        assert metrics.queue and all(model == "m" and isinstance(n, int) for model, n in metrics.queue)
        assert metrics.queue[-1] == ("m", 0)
    finally:
        engine.release()
        scheduler.stop()


async def test_a_users_streams_are_counted_back_as_they_end(start, tok) -> None:
    """Limit 2: the short first stream ends, and one (not two) of the waiting two takes its slot."""
    scheduler, engine = start(max_batch=4, max_streams_per_user=2)
    handles = [submit(scheduler, tok, request(10 + i, max_tokens=2 if i == 0 else 6, user="u")) for i in range(4)]
    for handle in handles:
        assert (await events(handle))[-1].reason == FinishReason.LENGTH
    assert max(engine.batch_sizes) == 2, engine.batch_sizes
    assert await asyncio.to_thread(wait_idle, scheduler, TIMEOUT)
    assert scheduler._running_per_user == {}


async def test_a_wait_for_a_users_own_limit_is_told_its_place_at_once(start, tok) -> None:
    scheduler, engine = start(max_streams_per_user=1)
    engine.step_delay = 0.01
    first = submit(scheduler, tok, request(10, max_tokens=60, user="u"))
    async for event in first.events():
        if isinstance(event, TokenEvent):
            break
    second = submit(scheduler, tok, request(11, user="u"))
    told = await asyncio.wait_for(second._queue.get(), TIMEOUT)
    assert told == QueuedEvent(1) and not first.sequence.done, "told while the first still runs"
    first.cancel()


async def test_the_line_moves_as_soon_as_the_next_one_is_admitted(start, tok) -> None:
    """max_batch 1: when the running stream ends, the next is admitted, and the one behind it is
    told it is now first before that admitted one's prefill is done."""
    scheduler, engine = start(max_batch=1)
    gate = threading.Event()
    engine.hooks["prefill"] = lambda state, tokens: gate.wait(TIMEOUT) if tokens[0] == prompt(11)[0] else None
    engine.hold()
    running = submit(scheduler, tok, request(10, max_tokens=3))
    await engine.until_parked()
    second, third = submit(scheduler, tok, request(11)), submit(scheduler, tok, request(12))
    engine.release()
    places: list[int] = []
    try:
        while places[-1:] != [1]:
            event = await asyncio.wait_for(third._queue.get(), TIMEOUT)
            assert isinstance(event, QueuedEvent), event
            places.append(event.position)
        assert not gate.is_set(), "told while the second's prefill is still held"
    finally:
        gate.set()
    assert places == [2, 1]
    for handle in (running, second):
        assert (await events(handle))[-1].reason == FinishReason.LENGTH


async def test_places_move_when_only_prefills_wait(start, tok) -> None:
    """Three admitted at once, prefilled one after another: the third is second in line, then first."""
    scheduler, engine = start(max_batch=4, prefill_chunk=2)
    engine.hold()
    handles = [submit(scheduler, tok, request(10, length=6))]
    await engine.until_parked()
    handles += [submit(scheduler, tok, request(tag, length=6)) for tag in (11, 12)]
    engine.release()
    third = [e.position for e in await events(handles[2]) if isinstance(e, QueuedEvent)]
    assert third == [2, 1]
    for handle in handles[:2]:
        await events(handle)


async def test_a_sequence_finished_before_its_prefill_failed_ends_as_it_finished(tok, caplog) -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(prefix_cache_bytes=0), name="fake",
                          metrics=FailingMetrics("time_to_first_token"))
    try:
        with caplog.at_level(logging.ERROR, logger="tokenwire.scheduler"):
            finished = (await events(submit(scheduler, tok, request(10, max_tokens=1))))[-1]
        assert finished.reason == FinishReason.LENGTH and finished.usage.completion_tokens == 1
        assert errors(caplog) == ["prefill of a sequence on fake failed"]
        assert scheduler.running == 0
        scheduler.metrics = Metrics()
        again = [e.token_id for e in await events(submit(scheduler, tok, request(11, max_tokens=2)))
                 if isinstance(e, TokenEvent)]
        assert again == expected(prompt(11), 2), "the scheduler goes on"
    finally:
        scheduler.stop()


def test_shared_prompt_blocks_keep_their_lines(tmp_path) -> None:
    path = tmp_path / "shared.txt"
    path.write_text("Xavier's rules:\nbe brief X\n---\n\n---\nsecond\n\n", encoding="utf-8")
    assert read_shared_prompts(str(path)) == ("Xavier's rules:\nbe brief X", "second")


def test_a_scheduler_is_unnamed_by_default() -> None:
    scheduler = Scheduler(FakeEngine(), SchedulerConfig(prefix_cache_bytes=0))
    try:
        assert scheduler.name == "" and scheduler._thread.name == "scheduler-"
    finally:
        scheduler.stop()


async def test_a_one_token_reply_ends_in_its_prefill_with_its_token(start, tok, caplog) -> None:
    scheduler, _ = start()
    with caplog.at_level(logging.ERROR, logger="tokenwire.scheduler"):
        got = await events(submit(scheduler, tok, request(10, max_tokens=1)))
    assert [e.token_id for e in got if isinstance(e, TokenEvent)] == expected(prompt(10), 1)
    assert got[-1].reason == FinishReason.LENGTH and errors(caplog) == []
