"""Choices of one request (n > 1) share one prefill: the first's prompt KV goes to the prefix cache
as it joins the batch, and the others, admitted behind it, compute only the last prompt token.
Fake engine; the log of prefill chunks says what was computed."""

from __future__ import annotations

import asyncio

from fake_engine import expected, prompt

from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import SequenceHandle
from tokenwire.server.engine.sequence import GenerationRequest, Sequence, TokenEvent


def handle_for(tok, share: bool, tag: int = 10) -> SequenceHandle:
    request = GenerationRequest(prompt_ids=prompt(tag, 12), max_tokens=3, sampling=SamplingConfig(temperature=0.0),
                                share_prefill=share)
    return SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())


async def tokens_of(handle: SequenceHandle) -> list[int]:
    async def run() -> list[int]:
        return [e.token_id async for e in handle.events() if isinstance(e, TokenEvent)]
    return await asyncio.wait_for(run(), 5)


async def run_three(start, tok, share: bool) -> tuple[list[int], list[list[int]]]:
    scheduler, engine = start(prefix_cache_bytes=1 << 20, prefill_chunk=4)
    handles = [handle_for(tok, share) for _ in range(3)]
    for handle in handles:
        scheduler.submit(handle)
    outputs = [await tokens_of(h) for h in handles]
    return [entry[2] for entry in engine.log if entry[0] == "prefill"], outputs


async def test_siblings_prefill_only_their_last_prompt_token(start, tok) -> None:
    chunks, outputs = await run_three(start, tok, share=True)
    assert chunks == [4, 4, 4, 1, 1], "12 prompt tokens once, then one each"
    assert outputs == [expected(prompt(10, 12), 3)] * 3


async def test_without_sharing_each_computes_its_prompt(start, tok) -> None:
    chunks, _ = await run_three(start, tok, share=False)
    assert sum(chunks) >= 24, "the second computes its whole prompt (the third may reuse a finished turn's)"
