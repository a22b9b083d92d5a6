"""The scheduler on a fake engine (tests/fake_engine.py): admission, fairness, cancellation,
failures, prefix reuse and unloading, in milliseconds and without a model.

Each request's prompt starts with a token of its own (its "tag"), by which the engine's log
names it. Where the order matters, the test parks the scheduler thread inside the engine
(`engine.hold()`), queues requests while it cannot admit them, then releases it, so what
follows is exact, not a matter of timing. test_scheduler.py runs the same features on the real
model (the slow tier).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_engine import EOS, POISON, FakeEngine, expected, prompt

from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import (
    QueueFull,
    Scheduler,
    SchedulerUnavailable,
    SequenceHandle,
)
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    QueuedEvent,
    Sequence,
    TokenEvent,
)

TIMEOUT = 5  # seconds for any one stream; every test here takes milliseconds


def request(tag: int, max_tokens: int = 3, user: str = "", length: int = 4, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt(tag, length), max_tokens=max_tokens,
                             sampling=SamplingConfig(temperature=0.0), user=user, **kw)


def submit(scheduler: Scheduler, tok, req: GenerationRequest, sequence: Sequence | None = None) -> SequenceHandle:
    handle = SequenceHandle(sequence or Sequence(req, tok), asyncio.get_running_loop())
    scheduler.submit(handle)
    return handle


async def consume(handle: SequenceHandle) -> tuple[list[int], FinishedEvent, list[int]]:
    """(token ids, the finished event, the queue positions reported) of one stream."""

    async def run():
        tokens, queued = [], []
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
            elif isinstance(event, QueuedEvent):
                queued.append(event.position)
            elif isinstance(event, FinishedEvent):
                return tokens, event, queued
        raise AssertionError("stream ended without a finished event")

    return await asyncio.wait_for(run(), TIMEOUT)


async def consume_all(handles: list[SequenceHandle]) -> list[tuple[list[int], FinishedEvent, list[int]]]:
    return list(await asyncio.gather(*(consume(h) for h in handles)))


def cached_prompt_tokens(finished: FinishedEvent) -> int:
    return finished.usage.cached_prompt_tokens


async def idle(scheduler: Scheduler) -> None:
    """Returns once the scheduler holds no request (its last rows have left the engine)."""
    for _ in range(TIMEOUT * 1000):
        if not scheduler.busy:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the scheduler is still busy")


def steps(engine: FakeEngine) -> list[tuple[int, ...]]:
    """The rows (by tag) of each decode step."""
    return [entry[1] for entry in engine.log if entry[0] == "step"]


def prefilled(engine: FakeEngine) -> list[int]:
    """Tags in the order their prefill started (each once)."""
    order: list[int] = []
    for entry in engine.log:
        if entry[0] == "prefill" and entry[1] not in order:
            order.append(entry[1])
    return order


async def parked_behind(scheduler: Scheduler, engine: FakeEngine, tok, req: GenerationRequest) -> SequenceHandle:
    """Submits `req` and returns once the scheduler thread waits inside its (held) prefill."""
    engine.hold()
    handle = submit(scheduler, tok, req)
    await engine.until_parked()
    return handle


# ---- batching -------------------------------------------------------------------------------


async def test_tokens_do_not_depend_on_the_batch_and_it_never_exceeds_max_batch(start, tok) -> None:
    scheduler, engine = start(max_batch=3, prefill_chunk=4)
    running_seen: list[int] = []
    engine.hooks["step"] = lambda tokens: running_seen.append(scheduler.running)
    engine.hooks["prefill"] = lambda state, tokens: running_seen.append(scheduler.running)
    reqs = [request(10 + i, max_tokens=8 + 3 * i, length=3 + 2 * i) for i in range(8)]
    first = await parked_behind(scheduler, engine, tok, reqs[0])
    handles = [first] + [submit(scheduler, tok, r) for r in reqs[1:]]
    engine.release()
    results = await consume_all(handles)
    for req, (tokens, finished, _) in zip(reqs, results, strict=True):
        assert tokens == expected(req.prompt_ids, req.max_tokens), "batched tokens differ from the model alone"
        assert finished.reason == FinishReason.LENGTH
        assert finished.text == tok.decode(tokens) == " ".join(f"w{t}" for t in tokens)
    assert max(engine.batch_sizes) == 3 and max(running_seen) == 3, "the batch fills up to max_batch, no further"
    assert sum(engine.batch_sizes) == sum(r.max_tokens - 1 for r in reqs), "one step per token after the first"
    assert [entry[2] for entry in engine.log if entry[0] == "prefill"] == [
        n for r in reqs for n in [4] * ((len(r.prompt_ids) - 1) // 4) + [(len(r.prompt_ids) - 1) % 4 + 1]
    ], "prompts are prefilled in chunks of prefill_chunk"
    await idle(scheduler)
    assert engine.lengths == []
    # Every token counts in the stats, the last of each sequence too.
    assert scheduler.stats.tokens_generated == sum(f.usage.completion_tokens for _, f, _ in results)
    assert scheduler.stats.tokens_generated == sum(r.max_tokens for r in reqs)


async def test_eos_stops_a_sequence_unless_ignored(start, tok) -> None:
    scheduler, engine = start(FakeEngine(eos_after=4), max_batch=4)
    stops = submit(scheduler, tok, request(10, max_tokens=10))
    ignores = submit(scheduler, tok, request(11, max_tokens=10, ignore_eos=True))
    (stopped, stopped_end, _), (ignored, ignored_end, _) = await consume_all([stops, ignores])
    assert stopped == expected(prompt(10), 10, eos_after=4) and len(stopped) == 4
    assert stopped_end.reason == FinishReason.STOP
    assert ignored == expected(prompt(11), 4) + [EOS] * 6 and ignored_end.reason == FinishReason.LENGTH
    assert ignored_end.text == tok.decode(ignored[:4]), "EOS is a special token: no text"


async def test_a_sequence_ending_at_its_first_token_never_joins_the_batch(start, tok) -> None:
    scheduler, engine = start(FakeEngine(eos_after=0))
    tokens, finished, _ = await consume(submit(scheduler, tok, request(10)))
    assert tokens == [] and finished.reason == FinishReason.STOP
    assert engine.batch_sizes == [] and engine.ended_prefills == 1


# ---- admission ------------------------------------------------------------------------------


async def test_bounded_queue_refuses_at_once_and_reports_positions(start, tok) -> None:
    scheduler, engine = start(max_batch=1, queue_size=3)
    running = await parked_behind(scheduler, engine, tok, request(10, max_tokens=4))
    waiting = [submit(scheduler, tok, request(11 + i, max_tokens=2)) for i in range(3)]
    assert scheduler.waiting == 3 and scheduler.running == 1
    with pytest.raises(QueueFull, match="busy") as refused:
        submit(scheduler, tok, request(20))  # refused while the engine is parked: nothing waited for
    assert refused.value.retry_after_s == 1
    assert scheduler.waiting == 3
    engine.release()
    results = await consume_all([running] + waiting)
    assert [queued for _, _, queued in results] == [[], [1], [2, 1], [3, 2, 1]], \
        "each waiting request is told its place, and told again each time it moves up"
    assert all(finished.reason == FinishReason.LENGTH for _, finished, _ in results)
    assert prefilled(engine) == [10, 11, 12, 13]
    # Drained: the queue takes requests again.
    tokens, finished, _ = await consume(submit(scheduler, tok, request(20, max_tokens=2)))
    assert tokens == expected(prompt(20), 2)


async def test_queue_bound_counts_the_slots_the_next_step_will_fill(start, tok) -> None:
    """With room in the batch, up to queue_size + free slots wait; one more is refused."""
    scheduler, engine = start(max_batch=3, queue_size=2)
    first = await parked_behind(scheduler, engine, tok, request(10))
    accepted, refused = [first], 0
    for i in range(6):
        try:
            accepted.append(submit(scheduler, tok, request(11 + i)))
        except QueueFull:
            refused += 1
    assert (len(accepted), refused) == (1 + 2 + 2, 2)
    engine.release()
    results = await consume_all(accepted)
    assert [tokens for tokens, _, _ in results] == [expected(prompt(10 + i), 3) for i in range(5)]


async def test_users_take_turns_round_robin(start, tok) -> None:
    scheduler, engine = start(max_batch=1, queue_size=16)
    a0 = await parked_behind(scheduler, engine, tok, request(10, user="A"))
    handles = {10: a0}
    for tag, user in [(11, "A"), (12, "A"), (13, "A"), (14, "A"), (15, "A"), (20, "B"), (21, "B"), (30, "C")]:
        handles[tag] = submit(scheduler, tok, request(tag, user=user))
    engine.release()
    results = dict(zip(handles, await consume_all(list(handles.values())), strict=True))
    order = [10, 11, 20, 30, 12, 21, 13, 14, 15]
    assert prefilled(engine) == order, "one request per user per turn, users in order of arrival"
    for place, tag in enumerate(order):
        assert results[tag][2] == list(range(place, 0, -1)), f"positions of {tag}"
        assert results[tag][0] == expected(prompt(tag), 3)


async def test_per_user_stream_limit(start, tok) -> None:
    scheduler, engine = start(max_batch=4, max_streams_per_user=1)
    a0 = await parked_behind(scheduler, engine, tok, request(10, user="A"))
    handles = [a0] + [submit(scheduler, tok, request(tag, user=user))
                      for tag, user in [(11, "A"), (12, "A"), (20, "B")]]
    engine.release()
    results = await consume_all(handles)
    assert all(finished.reason == FinishReason.LENGTH and len(tokens) == 3 for tokens, finished, _ in results)
    # A's streams one at a time; B, not limited by A's, shares steps with them.
    assert steps(engine) == [(10,), (10, 20), (20, 11), (11,), (12,), (12,)]


# ---- cancellation ---------------------------------------------------------------------------


async def test_cancel_frees_the_slot_within_one_step(start, tok) -> None:
    scheduler, engine = start(max_batch=1, queue_size=4)
    handles = []

    def cancel_during_third_step(tokens) -> None:
        if engine.steps == 2:
            handles[0].cancel()

    engine.hooks["step"] = cancel_during_third_step
    long = await parked_behind(scheduler, engine, tok, request(10, max_tokens=1000))
    handles.append(long)
    waiting = submit(scheduler, tok, request(11, max_tokens=2))
    engine.release()
    (long_tokens, long_end, _), (tokens, finished, queued) = await consume_all([long, waiting])
    assert long_end.reason == FinishReason.CANCELLED
    assert long_tokens == expected(prompt(10), 3), "the step that saw the cancel gives no token"
    assert tokens == expected(prompt(11), 2) and finished.reason == FinishReason.LENGTH and queued == [1]
    assert engine.log == [("prefill", 10, 4), ("step", (10,)), ("step", (10,)), ("step", (10,)),
                          ("prefill", 11, 4), ("step", (11,))], "the waiting request starts right after"


async def test_cancel_from_the_consumer_ends_the_stream_at_the_next_step(start, tok) -> None:
    scheduler, engine = start(max_batch=1)
    long = submit(scheduler, tok, request(10, max_tokens=1000))
    got = 0
    async for event in long.events():
        if isinstance(event, TokenEvent):
            got += 1
            if got == 2:
                engine.hold()
                await engine.until_parked()
                break
    parked_at = engine.steps
    long.cancel()
    engine.release()
    tokens, finished, _ = await consume(long)
    assert finished.reason == FinishReason.CANCELLED
    assert got + len(tokens) == parked_at + 1, "tokens: the prefill's and one per step before the cancel"
    await idle(scheduler)
    assert engine.steps == parked_at + 1, "only the parked step ran after the cancel"


async def test_cancel_while_queued_never_starts_and_moves_the_others_up(start, tok) -> None:
    scheduler, engine = start(max_batch=1, queue_size=4)
    running = await parked_behind(scheduler, engine, tok, request(10, max_tokens=10))
    first, cancelled, last = (submit(scheduler, tok, request(tag)) for tag in (11, 12, 13))
    last_position = []

    def on_step(tokens) -> None:
        if engine.steps == 2:
            cancelled.cancel()
        if engine.steps == 4:  # still running the first request: nobody was admitted meanwhile
            last_position.append(last.position)

    engine.hooks["step"] = on_step
    engine.release()
    results = await consume_all([running, first, cancelled, last])
    tokens, finished, queued = results[2]
    assert finished.reason == FinishReason.CANCELLED and tokens == [] and queued == [2]
    assert last_position == [2], "the one behind the cancelled request moved up at once"
    assert results[3][2] == [3, 2, 1]
    assert prefilled(engine) == [10, 11, 13]
    await idle(scheduler)
    assert scheduler.waiting == 0


async def test_cancel_while_waiting_for_prefill_frees_the_slot_at_once(start, tok) -> None:
    """An admitted request behind a long prefill is cancelled: its slot goes to the next in the
    queue before the long prefill ends."""
    scheduler, engine = start(max_batch=2, queue_size=4, prefill_chunk=4)
    long = await parked_behind(scheduler, engine, tok, request(10, max_tokens=2, length=41))
    behind, third = submit(scheduler, tok, request(11)), submit(scheduler, tok, request(12))
    chunks, third_position = [], []

    def on_prefill(state, tokens) -> None:
        chunks.append(len(tokens))
        if len(chunks) == 3:
            behind.cancel()
        if len(chunks) == 10:  # the long prompt's last chunk
            third_position.append(third.position)

    engine.hooks["prefill"] = on_prefill
    engine.release()
    results = await consume_all([long, behind, third])
    assert results[1][1].reason == FinishReason.CANCELLED and results[1][0] == [] and results[1][2] == [1]
    assert third_position == [1], "the third request took the freed slot during the long prefill"
    assert results[2][2] == [2, 1] and results[2][0] == expected(prompt(12), 3)
    assert prefilled(engine) == [10, 12]


# ---- failures -------------------------------------------------------------------------------


async def test_a_failing_prefill_ends_only_that_sequence(start, tok) -> None:
    scheduler, engine = start(max_batch=4)
    healthy = await parked_behind(scheduler, engine, tok, request(10, max_tokens=12))
    poisoned = submit(scheduler, tok, GenerationRequest(prompt_ids=[11, 5, POISON, 6], max_tokens=12,
                                                        sampling=SamplingConfig(temperature=0.0)))
    engine.release()
    (ok_tokens, ok_end, _), (bad_tokens, bad_end, _) = await consume_all([healthy, poisoned])
    assert bad_end.reason == FinishReason.ERROR and "poisoned prompt" in bad_end.error_message and bad_tokens == []
    assert ok_end.reason == FinishReason.LENGTH and ok_tokens == expected(prompt(10), 12)
    assert engine.ended_prefills == 1 and engine.resets == 0
    tokens, finished, _ = await consume(submit(scheduler, tok, request(12)))
    assert finished.reason == FinishReason.LENGTH and tokens == expected(prompt(12), 3)


async def test_a_failing_row_ends_only_that_row(start, tok) -> None:
    scheduler, engine = start(max_batch=4)
    healthy = await parked_behind(scheduler, engine, tok, request(10, max_tokens=12))
    broken_sequence = Sequence(request(11, max_tokens=12), tok)
    real_step, calls = broken_sequence.step, []

    def failing_step(logits):  # this sequence's sampling fails at its third token
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_step(logits)

    broken_sequence.step = failing_step
    broken = submit(scheduler, tok, broken_sequence.request, broken_sequence)
    engine.release()
    (ok_tokens, ok_end, _), (bad_tokens, bad_end, _) = await consume_all([healthy, broken])
    assert bad_end.reason == FinishReason.ERROR and "injected failure" in bad_end.error_message
    assert bad_tokens == expected(prompt(11), 2)
    assert ok_end.reason == FinishReason.LENGTH and ok_tokens == expected(prompt(10), 12)
    assert sum(11 in rows for rows in steps(engine)) == 2, "its row left at the failure"
    assert engine.resets == 0


async def test_a_failing_step_ends_its_batch_and_the_scheduler_goes_on(start, tok) -> None:
    scheduler, engine = start(max_batch=4)

    failed = []

    def fail_third_step(tokens) -> None:
        if engine.steps == 2 and not failed:
            failed.append(1)
            raise RuntimeError("step failed")

    engine.hooks["step"] = fail_third_step
    first = await parked_behind(scheduler, engine, tok, request(10, max_tokens=20))
    second = submit(scheduler, tok, request(11, max_tokens=20))
    engine.release()
    results = await consume_all([first, second])
    for _, finished, _ in results:
        assert finished.reason == FinishReason.ERROR and "step failed" in finished.error_message
    assert [len(tokens) for tokens, _, _ in results] == [3, 2]
    tokens, finished, _ = await consume(submit(scheduler, tok, request(12, max_tokens=5)))
    assert finished.reason == FinishReason.LENGTH and tokens == expected(prompt(12), 5)
    await idle(scheduler)
    assert engine.resets == 1 and engine.lengths == []


async def test_an_error_in_the_loop_fails_everyone_and_refuses_new_work(start, tok) -> None:
    scheduler, engine = start(max_batch=1)

    def failing(what: str):
        def fail(*_) -> None:
            raise RuntimeError(f"{what} failed")
        return fail

    # A failed step is the batch's; a failure while recovering from it is the loop's own.
    engine.hooks["step"] = failing("step")
    engine.hooks["reset"] = failing("reset")
    running = await parked_behind(scheduler, engine, tok, request(10, max_tokens=5))
    waiting = submit(scheduler, tok, request(11))
    engine.release()
    (_, running_end, _), (tokens, waiting_end, _) = await consume_all([running, waiting])
    assert running_end.reason == FinishReason.ERROR and "step failed" in running_end.error_message
    assert waiting_end.reason == FinishReason.ERROR and tokens == []
    assert waiting_end.error_message == "internal error: RuntimeError: reset failed"
    with pytest.raises(SchedulerUnavailable, match="internal error"):
        submit(scheduler, tok, request(12))


# ---- prefix reuse ---------------------------------------------------------------------------


async def test_prefix_reuse_reports_cached_tokens_and_gives_the_cold_tokens(start, tok) -> None:
    scheduler, engine = start(max_batch=2, prefix_cache_bytes=1 << 20)
    history = prompt(10, length=12)
    first, first_end, _ = await consume(submit(scheduler, tok, GenerationRequest(
        prompt_ids=history, max_tokens=6, sampling=SamplingConfig(temperature=0.0))))
    assert cached_prompt_tokens(first_end) == 0
    # The first turn's KV covers its prompt and every output token but the last (never fed back).
    turn2 = history + first + [5, 6, 7]
    warm, warm_end, _ = await consume(submit(scheduler, tok, GenerationRequest(
        prompt_ids=turn2, max_tokens=8, sampling=SamplingConfig(temperature=0.0))))
    assert cached_prompt_tokens(warm_end) == 12 + 6 - 1
    assert engine.log[-8] == ("prefill", 10, len(turn2) - 17), "only the uncached rest is prefilled"
    assert warm == expected(turn2, 8), "reused KV gives the tokens a cold prefill gives"
    assert (scheduler.prefix_cache.stats.hits, scheduler.prefix_cache.stats.misses) == (1, 1)
    # Under min_match (8) shared tokens: no reuse.
    other, other_end, _ = await consume(submit(scheduler, tok, GenerationRequest(
        prompt_ids=history[:5] + [40] * 10, max_tokens=2, sampling=SamplingConfig(temperature=0.0))))
    assert cached_prompt_tokens(other_end) == 0 and other == expected(history[:5] + [40] * 10, 2)


# ---- unloading ------------------------------------------------------------------------------


async def test_stop_lets_running_streams_finish_and_cancels_the_queue(start, tok) -> None:
    scheduler, engine = start(max_batch=1, queue_size=32)
    running = await parked_behind(scheduler, engine, tok, request(10, max_tokens=3))
    waiting = [submit(scheduler, tok, request(11)), submit(scheduler, tok, request(12))]
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    while True:  # until stop() has taken effect; what got in meanwhile waits like the others
        try:
            waiting.append(submit(scheduler, tok, request(13)))
        except SchedulerUnavailable as exc:
            assert "unloading" in str(exc)
            break
        await asyncio.sleep(0.001)
    engine.release()
    results = await consume_all([running] + waiting)
    await asyncio.to_thread(stopper.join, TIMEOUT)
    assert not stopper.is_alive()
    assert results[0][1].reason == FinishReason.LENGTH and results[0][0] == expected(prompt(10), 3)
    for tokens, finished, _ in results[1:]:
        assert finished.reason == FinishReason.CANCELLED and finished.error_message == "model unloaded"
        assert tokens == []
    assert prefilled(engine) == [10]
    with pytest.raises(SchedulerUnavailable, match="unloading"):
        submit(scheduler, tok, request(14))
