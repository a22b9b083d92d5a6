"""What mutation testing found unpinned in scheduler.py, on the fake engine: the Metrics hooks
(which model, which values, how often), the queue refusals' messages and counts, and the
waiting/running/busy figures.

Every expected figure comes from the request (its max_tokens, its prompt) or from the fake
engine's own log, not from a run of the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import numpy as np
import pytest
from fake_engine import FakeEngine, outcome, prompt

from tokenwire.server.engine.batch_engine import KVCache, PrefillState
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import (
    QueueFull,
    Scheduler,
    SchedulerConfig,
    SequenceHandle,
    shared_prefix_ids,
    wait_idle,
)
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    RefusedEvent,
    Sequence,
)
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.metrics import Metrics

TIMEOUT = 5
NAME = "fake-model"


class RecordingMetrics(Metrics):
    """Every hook call, as (hook, model, *values)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def queue_length(self, model: str, n: int) -> None:
        self.calls.append(("queue_length", model, n))

    def batch_size(self, model: str, n: int) -> None:
        self.calls.append(("batch_size", model, n))

    def time_to_first_token(self, model: str, seconds: float) -> None:
        self.calls.append(("time_to_first_token", model, seconds))

    def inter_token_latency(self, model: str, seconds: float) -> None:
        self.calls.append(("inter_token_latency", model, seconds))

    def tokens_generated(self, model: str, n: int) -> None:
        self.calls.append(("tokens_generated", model, n))

    def request_finished(self, model: str, reason: str) -> None:
        self.calls.append(("request_finished", model, reason))

    def prefix_cache(self, model: str, hit: bool, reused_tokens: int) -> None:
        self.calls.append(("prefix_cache", model, hit, reused_tokens))

    def prefix_cache_state(self, model: str, entries: int, nbytes: int, evictions: int) -> None:
        self.calls.append(("prefix_cache_state", model, entries, nbytes, evictions))

    def of(self, hook: str) -> list[tuple]:
        return [c[2:] for c in self.calls if c[0] == hook]


Recorded = tuple[Scheduler, FakeEngine, RecordingMetrics]


@pytest.fixture
async def recorded() -> AsyncIterator[Recorded]:
    """A scheduler named NAME on a fake engine, reporting to a RecordingMetrics; prefix cache on."""
    engine, metrics = FakeEngine(), RecordingMetrics()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, queue_size=4, prefix_cache_bytes=1 << 20),
                          name=NAME, metrics=metrics)
    yield scheduler, engine, metrics
    engine.release()
    scheduler.stop()


def request(tag: int, max_tokens: int = 3, user: str = "", length: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt(tag, length), max_tokens=max_tokens,
                             sampling=SamplingConfig(temperature=0.0), user=user)


def submit(scheduler: Scheduler, tok: TokenizerBundle, req: GenerationRequest) -> SequenceHandle:
    handle = SequenceHandle(Sequence(req, tok), asyncio.get_running_loop())
    scheduler.submit(handle)
    return handle


async def last_event(handle: SequenceHandle) -> tuple[list[int], FinishedEvent | RefusedEvent]:
    return await outcome(handle, TIMEOUT)


async def settle(scheduler: Scheduler) -> None:
    assert await asyncio.to_thread(wait_idle, scheduler, TIMEOUT)


# -- metrics -------------------------------------------------------------------------------------

async def test_metrics_of_one_request(recorded: Recorded, tok: TokenizerBundle) -> None:
    """One 3-token request: every hook names the model; 3 tokens counted in all, the first
    from the prefill; one time to first token and two inter-token latencies, each a small
    non-negative duration; one 'length' finish; the batch size after each of the 2 decode steps
    (1, then 0 once the row left); the queue 1 on submit and 0 once admitted."""
    scheduler, engine, metrics = recorded
    tokens, finished = await last_event(submit(scheduler, tok, request(10, max_tokens=3)))
    await settle(scheduler)
    assert len(tokens) == 3 and finished.reason == FinishReason.LENGTH
    assert {c[1] for c in metrics.calls} == {NAME}
    assert sum(n for (n,) in metrics.of("tokens_generated")) == 3
    assert metrics.of("tokens_generated")[0] == (1,)  # the prefill's token, reported at once
    [(ttft,)] = metrics.of("time_to_first_token")
    assert 0 <= ttft < TIMEOUT
    assert ttft == pytest.approx(finished.usage.time_to_first_token_ms / 1000, abs=1e-6)
    latencies = metrics.of("inter_token_latency")
    assert len(latencies) == 2 and all(0 <= s < TIMEOUT for (s,) in latencies)
    assert metrics.of("request_finished") == [(FinishReason.LENGTH.value,)]
    assert engine.batch_sizes == [1, 1]
    assert metrics.of("batch_size") == [(1,), (0,)]
    queue = [n for (n,) in metrics.of("queue_length")]
    assert queue[0] == 1 and queue[-1] == 0 and set(queue) == {0, 1}


async def test_metrics_of_prefix_reuse(recorded: Recorded, tok: TokenizerBundle) -> None:
    """The cache's hooks: a miss reusing 0 tokens, then a hit reusing what the first turn left
    (its prompt and all but its last token); its state after each store equals its stats."""
    scheduler, _, metrics = recorded
    history = prompt(10, length=12)
    first, _ = await last_event(submit(scheduler, tok, GenerationRequest(
        prompt_ids=history, max_tokens=4, sampling=SamplingConfig(temperature=0.0))))
    await settle(scheduler)
    stats = scheduler.prefix_cache.stats
    assert metrics.of("prefix_cache") == [(False, 0)]
    assert metrics.of("prefix_cache_state") == [(1, stats.bytes, 0)] and stats.bytes > 0
    turn2 = history + first + [5, 6]
    _, warm = await last_event(submit(scheduler, tok, GenerationRequest(
        prompt_ids=turn2, max_tokens=2, sampling=SamplingConfig(temperature=0.0))))
    await settle(scheduler)
    reused = len(history) + len(first) - 1
    assert warm.usage.cached_prompt_tokens == reused
    assert metrics.of("prefix_cache") == [(False, 0), (True, reused)]
    assert metrics.of("prefix_cache_state")[-1] == (stats.entries, stats.bytes, stats.evictions)


async def test_two_rows_in_one_step_count_two_tokens(tok: TokenizerBundle) -> None:
    """A decode step of two rows reports 2 tokens at once, and one latency per row; the batch
    size after each step is the number of rows still running."""
    engine, metrics = FakeEngine(), RecordingMetrics()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, prefill_chunk=64, prefix_cache_bytes=0),
                          name=NAME, metrics=metrics)
    try:
        engine.hold()
        a = submit(scheduler, tok, request(10, max_tokens=4))
        await engine.until_parked()
        b = submit(scheduler, tok, request(11, max_tokens=4))
        engine.release()
        await asyncio.gather(last_event(a), last_event(b))
        await settle(scheduler)
        rows = [entry[1] for entry in engine.log if entry[0] == "step"]
        assert rows == [(10,), (10, 11), (10, 11), (11,)]
        assert [n for (n,) in metrics.of("tokens_generated")] == [1, 1, 1, 2, 2, 1]
        assert scheduler.stats.tokens_generated == 8
        assert len(metrics.of("inter_token_latency")) == 6  # 3 per stream of 4 tokens
        assert metrics.of("batch_size") == [(1,), (2,), (1,), (0,)]
        assert metrics.of("request_finished") == [("length",), ("length",)]
    finally:
        engine.release()
        scheduler.stop()


# -- queue refusals ---------------------------------------------------------------------------

async def test_per_user_waiting_limit_counts_only_that_users_waiting_requests(tok: TokenizerBundle) -> None:
    """max_queued_per_user 2: a user's third waiting request is refused, naming the count and
    the limit; other users still get in, and a running request does not count as waiting."""
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, queue_size=10, max_queued_per_user=2,
                                                  prefix_cache_bytes=0), name=NAME)
    try:
        engine.hold()
        running = submit(scheduler, tok, request(10, user="a"))
        await engine.until_parked()
        waiting = [submit(scheduler, tok, request(t, user="a")) for t in (11, 12)]
        assert scheduler.waiting == 2 and scheduler.running == 1 and scheduler.busy
        with pytest.raises(QueueFull) as exc:
            submit(scheduler, tok, request(13, user="a"))
        assert str(exc.value) == (f"you already have 2 requests waiting for model {NAME} (at most 2 per user); "
                                  "retry when one has started")
        assert exc.value.retry_after_s == 1
        other = submit(scheduler, tok, request(20, user="b"))
        assert scheduler.waiting == 3
        engine.release()
        outcomes = [await last_event(h) for h in (running, *waiting, other)]
        assert all(isinstance(e, FinishedEvent) for _, e in outcomes)
        await settle(scheduler)
        assert (scheduler.waiting, scheduler.running, scheduler.busy) == (0, 0, False)
    finally:
        engine.release()
        scheduler.stop()


async def test_the_heaviest_users_refusal_names_how_many_they_held(tok: TokenizerBundle) -> None:
    """A full queue: the flooding user's newest waiting request is refused, its message naming
    the model and how many requests that user held, the queue's own refusal its size."""
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, queue_size=3, prefix_cache_bytes=0), name=NAME)
    try:
        engine.hold()
        first = submit(scheduler, tok, request(10, user="alice"))
        await engine.until_parked()
        flood = [submit(scheduler, tok, request(11 + i, user="alice")) for i in range(3)]
        bob = submit(scheduler, tok, request(20, user="bob"))
        assert scheduler.waiting == 3
        _, refused = await last_event(flood[-1])
        assert isinstance(refused, RefusedEvent)
        assert str(refused.error) == (f"the server is busy: the queue of model {NAME} is full and this user holds "
                                      "the most of it (3 requests); retry shortly")
        with pytest.raises(QueueFull) as exc:
            submit(scheduler, tok, request(30, user="bob"))
        assert str(exc.value) == ("the server is busy: 3 requests are already waiting for this model; "
                                  "retry shortly")
        engine.release()
        outcomes = [await last_event(h) for h in (first, *flood[:2], bob)]
        assert all(isinstance(e, FinishedEvent) for _, e in outcomes)
    finally:
        engine.release()
        scheduler.stop()


async def test_a_queue_of_size_zero_refuses_whoever_must_wait(tok: TokenizerBundle) -> None:
    """queue_size 0: a request that cannot start at once is refused (QueueFull, not a crash
    looking for the heaviest user of an empty queue)."""
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, queue_size=0, prefix_cache_bytes=0), name=NAME)
    try:
        engine.hold()
        running = submit(scheduler, tok, request(10, user="a"))
        await engine.until_parked()
        for user in ("a", "b"):
            with pytest.raises(QueueFull) as exc:
                submit(scheduler, tok, request(11, user=user))
            assert "0 requests are already waiting" in str(exc.value)
        assert scheduler.waiting == 0
        engine.release()
        _, finished = await last_event(running)
        assert isinstance(finished, FinishedEvent)
    finally:
        engine.release()
        scheduler.stop()


class PrefillRecordingEngine(FakeEngine):
    """Records the prefill states it made and those it was told to end."""

    def __init__(self, eos_after: int | None = None) -> None:
        super().__init__(eos_after=eos_after)
        self.made: list[object] = []
        self.ended: list[object] = []

    def new_prefill(self, prefix: KVCache | None = None, prefix_length: int = 0) -> PrefillState:
        state = super().new_prefill(prefix, prefix_length)
        self.made.append(state)
        return state

    def end_prefill(self, state: PrefillState) -> None:
        super().end_prefill(state)
        self.ended.append(state)


async def test_a_prefill_that_never_joins_is_ended_with_its_own_state(tok: TokenizerBundle) -> None:
    """A sequence that finishes at its first token (EOS from the prefill) never joins the batch:
    the engine is told to end exactly the prefill state it made for it."""
    engine = PrefillRecordingEngine(eos_after=0)
    scheduler = Scheduler(engine, SchedulerConfig(prefix_cache_bytes=0), name=NAME)
    try:
        tokens, finished = await last_event(submit(scheduler, tok, request(10, max_tokens=3)))
        await settle(scheduler)
        assert tokens == [] and isinstance(finished, FinishedEvent) and finished.reason == FinishReason.STOP
        assert len(engine.made) == 1 and engine.ended == engine.made
        assert engine.ended[0] is engine.made[0]
    finally:
        scheduler.stop()


async def test_wait_idle_gives_up_within_its_timeout(tok: TokenizerBundle) -> None:
    """wait_idle(0.05) on a busy scheduler returns False after about 0.05 s (polling every 10 ms),
    not after a long sleep; on an idle one True at once."""
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(prefix_cache_bytes=0), name=NAME)
    try:
        engine.hold()
        handle = submit(scheduler, tok, request(10))
        await engine.until_parked()
        began = asyncio.get_running_loop().time()
        assert wait_idle(scheduler, 0.05) is False
        assert asyncio.get_running_loop().time() - began < 0.5
        engine.release()
        await last_event(handle)
        await settle(scheduler)
        began = asyncio.get_running_loop().time()
        assert wait_idle(scheduler, 10) is True
        assert asyncio.get_running_loop().time() - began < 0.5
    finally:
        engine.release()
        scheduler.stop()


def failing_at(sequence: Sequence, call: int) -> Sequence:
    """Makes this sequence's sampling raise RuntimeError('injected failure') at its `call`-th
    step (the first step is the prefill's token)."""
    real_step, calls = sequence.step, []

    def step(logits: np.ndarray) -> tuple[list, int | None]:
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return real_step(logits)

    sequence.step = step  # type: ignore[method-assign]
    return sequence


async def test_a_row_failing_in_sampling_is_logged_counted_and_not_cached(tok: TokenizerBundle,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The row whose sampling raises ends with ERROR naming the exception's type and text, the
    failure is logged with the model's name, only the 2 tokens it produced are counted (one
    inter-token latency), and its KV is not offered to the prefix cache."""
    engine, metrics = FakeEngine(), RecordingMetrics()
    scheduler = Scheduler(engine, SchedulerConfig(prefix_cache_bytes=1 << 20), name=NAME, metrics=metrics)
    try:
        sequence = failing_at(Sequence(request(11, max_tokens=12), tok), 3)
        handle = SequenceHandle(sequence, asyncio.get_running_loop())
        with caplog.at_level("ERROR", logger="tokenwire.scheduler"):
            scheduler.submit(handle)
            tokens, finished = await last_event(handle)
            await settle(scheduler)
        assert isinstance(finished, FinishedEvent) and finished.reason == FinishReason.ERROR
        assert finished.error_message == "RuntimeError: injected failure"
        assert len(tokens) == 2
        [record] = [r for r in caplog.records if r.name == "tokenwire.scheduler"]
        assert record.getMessage() == f"sampling a sequence on {NAME} failed"
        assert record.exc_info is not None and str(record.exc_info[1]) == "injected failure"
        assert sum(n for (n,) in metrics.of("tokens_generated")) == 2
        assert len(metrics.of("inter_token_latency")) == 1
        assert metrics.of("request_finished") == [(FinishReason.ERROR.value,)]
        assert scheduler.prefix_cache.stats.entries == 0 and metrics.of("prefix_cache_state") == []
    finally:
        scheduler.stop()


async def test_no_prefix_cache_hooks_when_the_cache_is_off(tok: TokenizerBundle) -> None:
    """prefix_cache_bytes 0: nothing is looked up or stored, and the cache hooks are never called."""
    engine, metrics = FakeEngine(), RecordingMetrics()
    scheduler = Scheduler(engine, SchedulerConfig(prefix_cache_bytes=0), name=NAME, metrics=metrics)
    try:
        for tag in (10, 10):
            tokens, finished = await last_event(submit(scheduler, tok, request(tag, max_tokens=3)))
            assert isinstance(finished, FinishedEvent) and finished.usage.cached_prompt_tokens == 0
        await settle(scheduler)
        assert metrics.of("prefix_cache") == [] and metrics.of("prefix_cache_state") == []
        assert metrics.of("request_finished") == [("length",), ("length",)]
    finally:
        scheduler.stop()


# -- the scheduler's own set-up, and the token forms of a marked shared prompt -----------------

class AxisOneEngine(FakeEngine):
    seq_axis = 1


def test_the_prefix_cache_slices_on_the_engines_sequence_axis_and_the_thread_is_a_named_daemon() -> None:
    """The cache takes the engine's seq_axis (not its own default); the loop's thread is named
    after the model (for thread dumps) and is a daemon (an unstopped scheduler never keeps the
    process alive)."""
    scheduler = Scheduler(AxisOneEngine(), SchedulerConfig(prefix_cache_bytes=0), name=NAME)
    try:
        assert scheduler.prefix_cache.seq_axis == 1
        assert scheduler._thread.name == f"scheduler-{NAME}" and scheduler._thread.daemon is True
    finally:
        scheduler.stop()


class StubTokenizer:
    """encode: one id per word (its length + 10); encode_chat: the system message framed by 1 and
    2 (3 more with a generation prompt); refuses the text 'bad template' as a chat."""

    def __init__(self) -> None:
        self.chats: list[tuple[list[dict[str, str]], bool]] = []

    def encode(self, text: str) -> list[int]:
        return [10 + len(word) for word in text.split()]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        self.chats.append((messages, add_generation_prompt))
        [message] = messages
        if message["content"] == "bad template":
            raise ValueError("this template refuses a lone system message")
        assert message["role"] == "system"
        return [1, *self.encode(message["content"]), 2] + ([3] if add_generation_prompt else [])


def test_shared_prefix_ids_are_the_chat_and_raw_forms_longest_first() -> None:
    """Each marked prompt gives its system-message form (no generation prompt) and its raw form,
    each kept only with at least min_match tokens; a template that refuses still leaves the raw
    form; all of them longest first."""
    stub = StubTokenizer()
    prompts = ("a bb ccc", "bad template", "dddd e", "x")
    found = shared_prefix_ids(prompts, cast(TokenizerBundle, stub), 2)
    assert set(found) == {(1, 11, 12, 13, 2), (1, 14, 11, 2), (11, 12, 13), (1, 11, 2), (13, 18), (14, 11)}
    assert [len(ids) for ids in found] == [5, 4, 3, 3, 2, 2]  # ties in no particular order
    assert all(flag is False for _, flag in stub.chats)
    assert [m for m, _ in stub.chats][0] == [{"role": "system", "content": "a bb ccc"}]
    # Exactly min_match tokens is enough: "x" raw is 1 token, its chat form 3.
    assert shared_prefix_ids(("x",), cast(TokenizerBundle, stub), 3) == [(1, 11, 2)]
    assert shared_prefix_ids(prompts, None, 2) == []
