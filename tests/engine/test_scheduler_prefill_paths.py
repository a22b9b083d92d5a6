"""The scheduler's edges that mutation testing found unpinned: a prefill that fails or is cancelled
part way ends only its own sequence (with the exact reason and text) and gives its prefill back;
the batch never holds more than max_batch rows; a request that has to wait is told its place and
told again as the line moves. Fake engine, milliseconds."""

from __future__ import annotations

import asyncio
import logging

from fake_engine import FIRST_WORD, POISON, expected

from tokenwire.server.engine.records import FinishReason
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import SequenceHandle
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    GenerationRequest,
    QueuedEvent,
    Sequence,
    TokenEvent,
)


def handle_for(tok, prompt: list[int], max_tokens: int = 4) -> SequenceHandle:
    request = GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0))
    return SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())


async def collect(handle: SequenceHandle) -> tuple[list[int], list[int], FinishedEvent]:
    tokens, positions = [], []
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, QueuedEvent):
            positions.append(event.position)
        elif isinstance(event, FinishedEvent):
            return tokens, positions, event
    raise AssertionError("no finished event")


def words(first: int, n: int) -> list[int]:
    return [FIRST_WORD + (first + i) % 40 for i in range(n)]


async def test_a_failing_prefill_ends_its_own_sequence_with_its_error(start, tok, caplog) -> None:
    scheduler, engine = start(prefill_chunk=2)
    good = words(5, 6)
    bad, fine = handle_for(tok, words(1, 3) + [POISON] + words(2, 3)), handle_for(tok, good)
    with caplog.at_level(logging.ERROR, logger="tokenwire.engine"):
        scheduler.submit(bad)
        scheduler.submit(fine)
        (_, _, failed), (tokens, _, done) = await asyncio.wait_for(asyncio.gather(collect(bad), collect(fine)), 5)
    assert failed.reason == FinishReason.ERROR and failed.error_message == "RuntimeError: poisoned prompt"
    assert done.reason == FinishReason.LENGTH and tokens == expected(good, 4)
    assert engine.ended_prefills == 1, "the failed prefill was given back"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "prefill of a sequence on fake failed"]
    again = handle_for(tok, words(9, 3))
    scheduler.submit(again)
    assert (await asyncio.wait_for(collect(again), 5))[0] == expected(words(9, 3), 4), "the scheduler goes on"


async def test_a_prefill_cancelled_part_way_is_cancelled_and_given_back(start, tok) -> None:
    scheduler, engine = start(prefill_chunk=2)
    victim = handle_for(tok, words(1, 10))
    chunks = []

    def on_prefill(state, tokens) -> None:
        chunks.append(len(tokens))
        if len(chunks) == 2:
            victim.cancel()  # while its prompt is half prefilled

    engine.hooks["prefill"] = on_prefill
    scheduler.submit(victim)
    tokens, _, finished = await asyncio.wait_for(collect(victim), 5)
    assert finished.reason == FinishReason.CANCELLED and tokens == [] and finished.usage.completion_tokens == 0
    assert engine.ended_prefills == 1 and len(chunks) < 5, "it stopped prefilling and gave the prefill back"
    engine.hooks.clear()
    after = handle_for(tok, words(3, 3))
    scheduler.submit(after)
    assert (await asyncio.wait_for(collect(after), 5))[0] == expected(words(3, 3), 4)


async def test_the_batch_never_holds_more_than_max_batch_rows(start, tok) -> None:
    scheduler, engine = start(max_batch=2)
    handles = [handle_for(tok, words(i * 7, 3), max_tokens=6) for i in range(3)]
    for h in handles:
        scheduler.submit(h)
    results = await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), 5)
    assert all(r[2].reason == FinishReason.LENGTH for r in results)
    widths = [len(entry[1]) for entry in engine.log if entry[0] == "step"]
    assert widths and max(widths) == 2


async def test_a_waiting_request_is_told_its_place_as_the_line_moves(start, tok) -> None:
    scheduler, engine = start(max_batch=1)
    engine.hold()  # the scheduler cannot admit while the first is parked inside its prefill
    first = handle_for(tok, words(1, 3), max_tokens=3)
    scheduler.submit(first)
    await engine.until_parked()
    second, third = handle_for(tok, words(11, 3), 3), handle_for(tok, words(21, 3), 3)
    scheduler.submit(second)
    scheduler.submit(third)
    engine.release()
    results = await asyncio.wait_for(asyncio.gather(collect(first), collect(second), collect(third)), 5)
    assert results[0][1] == [], "admitted at once: never queued"
    assert results[1][1] == [1] and results[2][1] == [2, 1], "places told at once, then as the line moved"
