"""A chat's KV restored from disk, on the real default model: the arrays read back are the ones
the turn left, bit for bit, and the next turn decodes from them exactly as from the memory cache
(same greedy tokens, equal logprobs) and as a full recompute does (same tokens); a damaged or
stale file is passed over and the turn answers as recomputed.

One engine serves every scheduler here (one at a time): a new Scheduler is a restarted server as
far as caches go (an empty prefix cache), and a new KVDiskTier on the same folder is a restarted
server's disk tier (its index scanned afresh)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.kv_disk import KVDiskTier, graph_fingerprint
from tokenwire.server.engine.prefix_cache import _common_prefix
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import Scheduler, SchedulerConfig, SequenceHandle
from tokenwire.server.engine.sequence import FinishedEvent, GenerationRequest, Sequence, TokenEvent
from tokenwire.server.engine.tokenizer import TokenizerBundle

MODEL = "smollm2-135m:int4"
CHAT, OWNER = "0123456789abcdef", "key-user:7"
SYSTEM = "You are a patient tutor. Explain things step by step, with one short example each time."
FIRST = "How does a lighthouse warn ships at night, and why do lighthouses flash in different patterns?"
SECOND = "And how did keepers keep the lamp burning through a storm?"


@dataclass
class Turn:
    tokens: list[int]
    logprobs: list[float]
    cached: int


async def run(scheduler: Scheduler, tok: TokenizerBundle, prompt: list[int], kv_key: str = "",
              max_tokens: int = 12) -> Turn:
    request = GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0),
                                include_logprobs=True, ignore_eos=True, user=OWNER, cache_scope=OWNER, kv_key=kv_key)
    handle = SequenceHandle(Sequence(request, tok), asyncio.get_running_loop())
    scheduler.submit(handle)
    tokens, logprobs = [], []
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
            logprobs.append(event.logprob)
        elif isinstance(event, FinishedEvent):
            return Turn(tokens, logprobs, event.usage.cached_prompt_tokens)
    raise AssertionError("no finished event")


async def turn_on(engine, tok, prompt: list[int], kv_disk=None, kv_key: str = "", memory: bool = True,
                  preload: tuple[list[int], list[np.ndarray]] | None = None) -> Turn:
    """One turn on a fresh scheduler (empty caches) over the shared engine, then stopped."""
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=2, prefix_cache_bytes=(256 << 20) if memory else 0),
                          name=MODEL, kv_disk=kv_disk)
    try:
        if preload is not None:
            scheduler.prefix_cache.store(preload[0], preload[1], OWNER)
        return await asyncio.wait_for(run(scheduler, tok, prompt, kv_key), 60)
    finally:
        scheduler.stop()


@dataclass
class FirstTurn:
    engine: FastEngine
    tok: TokenizerBundle
    fingerprint: str
    root: Path
    file: Path
    file_bytes: bytes
    kept_tokens: list[int]  # what the turn's KV is of
    kept_kv: list[np.ndarray]  # as the memory cache holds it
    second_prompt: list[int]
    recomputed: Turn  # the second turn with no cache at all


@pytest.fixture(scope="module")
def first_turn(int4_dir: Path, tmp_path_factory) -> FirstTurn:
    engine, tok = FastEngine(int4_dir, context_length=2048), TokenizerBundle(int4_dir)
    fingerprint = graph_fingerprint(int4_dir, engine)
    root = tmp_path_factory.mktemp("kv-restore") / "kv"
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    prompt = tok.encode_chat(chat, add_generation_prompt=True)

    async def go():
        tier = KVDiskTier(root, 1 << 30)
        scheduler = Scheduler(engine, SchedulerConfig(max_batch=2, prefix_cache_bytes=256 << 20), name=MODEL,
                              kv_disk=tier.for_model(MODEL, fingerprint, engine.seq_axis))
        try:
            first = await asyncio.wait_for(run(scheduler, tok, prompt, CHAT, max_tokens=24), 60)
            [(key, kv)] = scheduler.prefix_cache._entries.items()
        finally:
            scheduler.stop()
            assert tier.close(10)
        reply = tok.decode(first.tokens)
        second = tok.encode_chat(chat + [{"role": "assistant", "content": reply}, {"role": "user", "content": SECOND}],
                                 add_generation_prompt=True)
        recomputed = await turn_on(engine, tok, second, memory=False)
        return first, list(key[1]), kv, second, recomputed

    first, kept_tokens, kept_kv, second, recomputed = asyncio.run(go())
    assert kept_tokens == (prompt + first.tokens)[:-1], "the KV of a finished turn is of its prompt and reply"
    [file] = list(root.rglob("*.kv"))
    return FirstTurn(engine, tok, fingerprint, root, file, file.read_bytes(), kept_tokens, kept_kv, second,
                     recomputed)


def restart(turn: FirstTurn, data: bytes | None = None) -> KVDiskTier:
    """The first turn's file as it was written (or `data` in its place), under a fresh tier."""
    for stray in turn.root.rglob("*.kv"):
        stray.unlink()
    turn.file.write_bytes(data if data is not None else turn.file_bytes)
    return KVDiskTier(turn.root, 1 << 30)


async def test_restored_kv_is_bit_for_bit_what_the_turn_left_and_decodes_as_from_memory(first_turn) -> None:
    t = first_turn
    reuse = _common_prefix(tuple(t.kept_tokens), t.second_prompt, len(t.second_prompt) - 1)
    assert reuse >= len(t.kept_tokens) - 2 > 60, "the next turn's prompt extends the first turn's tokens"
    tier = restart(t)
    try:
        store = tier.for_model(MODEL, t.fingerprint, t.engine.seq_axis)
        n, restored = store.lookup(OWNER, CHAT, t.kept_tokens + [1])
        assert n == len(t.kept_tokens)
        for got, kept in zip(restored, t.kept_kv, strict=True):
            assert got.dtype == kept.dtype and got.shape == kept.shape and np.array_equal(got, kept)
        from_disk = await turn_on(t.engine, t.tok, t.second_prompt, store, CHAT)
    finally:
        tier.close()
    assert from_disk.cached == reuse and tier.stats.hits == 2
    from_memory = await turn_on(t.engine, t.tok, t.second_prompt, preload=(t.kept_tokens, t.kept_kv))
    assert from_memory.cached == reuse
    assert from_disk.tokens == from_memory.tokens and from_disk.logprobs == from_memory.logprobs, \
        "KV from disk must decode exactly as the same KV from memory"
    assert from_disk.tokens == t.recomputed.tokens, "and give the tokens a full recompute gives"
    # Equal here (the native kernels compute each position alike in prefill and decode); other kernels
    # may round a prefill's positions differently from the decode steps that made the stored KV.
    assert np.allclose(from_disk.logprobs, t.recomputed.logprobs, atol=1e-3)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other model build"])
async def test_a_damaged_or_stale_file_is_passed_over_and_the_turn_answers_as_recomputed(first_turn, damage) -> None:
    t = first_turn
    data, fingerprint = t.file_bytes, t.fingerprint
    if damage == "flipped byte":
        data = data[:-1000] + bytes([data[-1000] ^ 0x10]) + data[-999:]
    elif damage == "truncated":
        data = data[: len(data) - 4096]
    else:
        fingerprint = "a-rebuilt-graph"
    tier = restart(t, data)
    try:
        turn = await turn_on(t.engine, t.tok, t.second_prompt, tier.for_model(MODEL, fingerprint), CHAT)
        assert tier.flush(10)
    finally:
        tier.close()
    assert turn.cached == 0 and tier.stats.hits == 0 and tier.stats.misses == 1
    assert (turn.tokens, turn.logprobs) == (t.recomputed.tokens, t.recomputed.logprobs), "the same full recompute"
    [now] = list(t.file.parent.iterdir())  # the second turn's own file replaced the passed-over one
    assert now != t.file and tier.stats.writes == 1
    assert (tier.stats.corrupt, tier.stats.stale) == ((0, 1) if damage == "other model build" else (1, 0))
