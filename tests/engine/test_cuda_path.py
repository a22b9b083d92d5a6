"""The CUDA path on a real GPU: marker `cuda`, skipped without one ("no CUDA GPU", tests/skip_policy.py).

The model is the default's shape with random weights (tests/random_weight_models.py: no download),
built twice from the same weights: the CUDA layout (fp16 KV cache in device memory, bound through
IO binding) runs on the device, the CPU layout (fp32 KV) on the CPU provider as the reference.
An fp16 cache cannot match fp32 bit for bit, so two numerics are compared by the logits' largest
difference and by their greedy choice, which must agree wherever the reference's margin between
its top two tokens exceeds twice that difference (elsewhere a near-tie decides, not a bug).

- the KV cache decode equals a full recompute of the sequence, across the buffers' growth;
- chunked prefill and a prefill from a reused prefix equal one whole prefill;
- a sequence decodes alike alone and in a batch that others join and leave;
- a cancelled stream frees its slot within a step and leaves the engine clean;
- teacher-forced over fixed text, the device's top-1 token agrees with the CPU graph's >= 99%.

Environment: TOKENWIRE_GPU_MODELS, a store built by random_weight_models.py (bench/gpu_check.sh
builds one), else the module builds its own (~20 s); TOKENWIRE_GPU_OUT, a folder to write the
figures to (cuda_checks.json); TOKENWIRE_CUDA_TEST_STEPS, positions of the agreement test (512);
TOKENWIRE_CUDA_TEST_DEVICE=cpu, a rehearsal of the same checks on this CPU (the CUDA layout on the
CPU provider, with device-owned buffers as on the GPU): not marked `cuda`, so it runs anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from random_weight_models import build_store

from tokenwire.server.build.quality import eval_text
from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import Scheduler, SchedulerConfig, SequenceHandle, wait_idle
from tokenwire.server.engine.sequence import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    Sequence,
    TokenEvent,
)
from tokenwire.server.engine.tokenizer import TokenizerBundle

DEVICE = os.environ.get("TOKENWIRE_CUDA_TEST_DEVICE", "cuda")
STEPS = int(os.environ.get("TOKENWIRE_CUDA_TEST_STEPS", "512"))
MIN_TOP1_AGREEMENT = 0.99
CONTEXT = 1024

pytestmark = [pytest.mark.slow] + ([pytest.mark.cuda] if DEVICE == "cuda" else [])

FIGURES: dict[str, dict] = {}  # test -> what it measured, written to TOKENWIRE_GPU_OUT/cuda_checks.json


@pytest.fixture(scope="module")
def random_store(tmp_path_factory) -> dict[str, Path]:
    given = os.environ.get("TOKENWIRE_GPU_MODELS")
    root = Path(given) if given else tmp_path_factory.mktemp("random-models")
    folders = build_store(root, default="cuda" if DEVICE == "cuda" else "cpu")
    yield folders
    out = os.environ.get("TOKENWIRE_GPU_OUT")
    if out and FIGURES:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "cuda_checks.json").write_text(json.dumps({"device": DEVICE, **FIGURES}, indent=2) + "\n")


@pytest.fixture(scope="module")
def tokenizer(random_store) -> TokenizerBundle:
    return TokenizerBundle(random_store["cuda"])


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> list[int]:
    return tokenizer.encode(eval_text())


def device_engine(folders: dict[str, Path]) -> FastEngine:
    """The CUDA layout on the device under test (device-owned buffers also in the CPU rehearsal)."""
    return FastEngine(folders["cuda"], device=DEVICE, context_length=CONTEXT,
                      device_buffers=True if DEVICE == "cpu" else None)


def reference_engine(folders: dict[str, Path]) -> FastEngine:
    """The CPU layout on the CPU, on onnxruntime's kernels (the linears the CUDA graph has)."""
    return FastEngine(folders["cpu"], device="cpu", context_length=CONTEXT, kernels="onnxruntime")


def same_choice(ref: np.ndarray, got: np.ndarray) -> tuple[bool, float]:
    """(greedy choices agree or the reference's top two lie within twice the difference, the
    largest difference)."""
    diff = float(np.abs(ref - got).max())
    top, other = int(np.argmax(ref)), int(np.argmax(got))
    return top == other or float(ref[top] - ref[other]) <= 2 * diff, diff


def check_rows(ref: list[np.ndarray], got: list[np.ndarray], tol: float, what: str) -> dict:
    """Every position agrees (same_choice) and differs by less than `tol`; returns the figures."""
    assert len(ref) == len(got)
    diffs = []
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        agrees, diff = same_choice(a, b)
        assert agrees, f"{what}: position {i} picks {int(np.argmax(b))}, not {int(np.argmax(a))} (diff {diff:.4f})"
        diffs.append(diff)
    assert max(diffs) < tol, f"{what}: logits differ by up to {max(diffs):.4f} (tolerance {tol})"
    top1 = float(np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ref, got, strict=True)]))
    return {"positions": len(ref), "max_abs_diff": max(diffs), "top1_agreement": top1,
            "bit_identical": all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))}


def teacher_forced(engine: FastEngine, ids: list[int], prompt: int) -> np.ndarray:
    """Logits [len(ids) - prompt + 1, vocab]: after the prompt, then after each next token of `ids`."""
    state = engine.new_prefill()
    out = [engine.prefill(state, ids[:prompt]).copy()]
    engine.join(state)
    for token in ids[prompt:-1]:
        out.append(engine.step([token])[0].copy())
    return np.stack(out)


def test_the_cuda_layout_runs_on_the_device(random_store) -> None:
    engine = device_engine(random_store)
    assert engine.dtype == np.float16 and engine.device_buffers
    if DEVICE == "cuda":
        assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
    state = engine.new_prefill()
    logits = engine.prefill(state, [1, 2, 3, 4])
    engine.join(state)
    logits2 = engine.step([5])
    assert np.isfinite(logits).all() and np.isfinite(logits2).all() and logits2.shape == (1, engine.vocab)
    placed = {v.device_name().lower() for v in engine._bindings["decode"][3]}
    assert placed == {DEVICE}, f"the KV buffers live on {placed}, not on {DEVICE}"
    FIGURES["device"] = {"providers": engine.session.get_providers(), "kv_dtype": str(np.dtype(engine.dtype)),
                         "kv_buffers_on": sorted(placed)}


def test_kv_cache_decode_equals_full_recompute(random_store, text_ids) -> None:
    """Decoding through the cache (past 256 positions, where the buffers grow) against running
    the whole sequence again at each checked step, both on the device."""
    cached, full = device_engine(random_store), device_engine(random_store)
    seq = text_ids[:30]
    state = cached.new_prefill()
    logits = cached.prefill(state, seq)
    cached.join(state)
    checked = set(range(6)) | set(range(224, 229)) | {100, 239}
    ref, got = [], []
    for step in range(240):
        if step in checked:
            again = full.new_prefill()
            ref.append(full.prefill(again, seq).copy())
            full.end_prefill(again)
            got.append(logits.copy())
        seq.append(text_ids[len(seq)])
        logits = cached.step([seq[-1]])[0]
    assert cached.lengths == [len(seq)] and cached._cap >= 270
    FIGURES["kv_cache_vs_recompute"] = check_rows(ref, got, 0.25, "cached decode vs full recompute")


def test_chunked_and_prefix_prefill_equal_one_prefill(random_store, text_ids) -> None:
    ids = text_ids[:100]
    one = device_engine(random_store)
    whole = one.prefill(one.new_prefill(), ids).copy()
    chunks = device_engine(random_store)
    state = chunks.new_prefill()
    for a, b in ((0, 40), (40, 77), (77, 99)):
        chunks.prefill(state, ids[a:b])
    chunked = chunks.prefill(state, ids[99:]).copy()
    # A prefix reused from a decoded row (the prefix cache's path), then the rest of the prompt.
    reuse = device_engine(random_store)
    state = reuse.new_prefill()
    reuse.prefill(state, ids[:59])
    reuse.join(state)
    reuse.step([ids[59]])
    cache = reuse.row_cache(0)
    assert cache[0].shape[2] == 60
    state = reuse.new_prefill(cache, 60)
    from_prefix = reuse.prefill(state, ids[60:]).copy()
    FIGURES["chunked_prefill"] = check_rows([whole], [chunked], 0.25, "chunked prefill vs one prefill")
    FIGURES["prefix_prefill"] = check_rows([whole], [from_prefix], 0.25, "prefill from a prefix vs one prefill")


def test_a_sequence_decodes_alike_alone_and_in_a_batch(random_store, text_ids) -> None:
    """Sequence A teacher-forced alone, then in a batch: B runs before it, C (long: the buffers
    grow) joins after it, B leaves (A moves up a row), C leaves."""
    a_ids, b_ids, c_ids = text_ids[:24] + text_ids[600:660], text_ids[100:130] + text_ids[700:760], text_ids[300:640]
    alone_engine = device_engine(random_store)
    alone = list(teacher_forced(alone_engine, a_ids, 24))

    batch = device_engine(random_store)
    feeds = {"b": iter(b_ids[31:]), "c": iter(c_ids[281:])}
    state = batch.new_prefill()
    batch.prefill(state, b_ids[:31])
    batch.join(state)
    rows = ["b"]
    for _ in range(5):
        batch.step([next(feeds["b"])])
    state = batch.new_prefill()
    together = [batch.prefill(state, a_ids[:24]).copy()]
    batch.join(state)
    rows.append("a")
    feeds["a"] = iter(a_ids[24:])
    for step in range(len(a_ids) - 25):
        if step == 10:  # C joins: 281 positions, past the first 256 allocated
            state = batch.new_prefill()
            batch.prefill(state, c_ids[:281])
            batch.join(state)
            rows.append("c")
        if step == 30:
            batch.remove([rows.index("b")])
            rows.remove("b")
        if step == 45:
            batch.remove([rows.index("c")])
            rows.remove("c")
        logits = batch.step([next(feeds[r]) for r in rows])
        together.append(logits[rows.index("a")].copy())
    assert rows == ["a"] and batch.lengths == [len(a_ids) - 1]
    FIGURES["batch_invariance"] = check_rows(alone, together, 0.1, "A in a batch vs A alone")


def test_a_cancelled_stream_frees_its_slot_within_a_step(random_store, tokenizer) -> None:
    def request(text: str, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt_ids=tokenizer.encode(text), max_tokens=max_tokens, ignore_eos=True,
                                 sampling=SamplingConfig(temperature=0.0))

    async def tokens_of(handle: SequenceHandle) -> tuple[list[int], FinishedEvent]:
        ids = []
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
            elif isinstance(event, FinishedEvent):
                return ids, event
        raise AssertionError("no finished event")

    async def scenario() -> dict:
        loop = asyncio.get_running_loop()
        engine = device_engine(random_store)
        scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, queue_size=4, prefix_cache_bytes=0), name="cuda")
        try:
            def submit(req: GenerationRequest) -> SequenceHandle:
                handle = SequenceHandle(Sequence(req, tokenizer), loop)
                scheduler.submit(handle)
                return handle

            long = submit(request("Write a very long story:", 2000))
            waiting = submit(request("Hi", 3))
            got = 0
            async for event in long.events():
                if isinstance(event, TokenEvent):
                    got += 1
                    if got == 3:
                        steps_at_cancel = scheduler.stats.steps
                        long.cancel()
                elif isinstance(event, FinishedEvent):
                    assert event.reason == FinishReason.CANCELLED
                    break
            ids, finished = await asyncio.wait_for(tokens_of(waiting), 120)
            assert finished.reason == FinishReason.LENGTH and len(ids) == 3
            # The waiting request started within a step or two of the cancel, not after 2000 tokens.
            steps_after = scheduler.stats.steps - steps_at_cancel
            assert steps_after <= 2 + 3
            assert await asyncio.to_thread(wait_idle, scheduler) and engine.lengths == []
            # The engine is clean: the same request gives what a fresh engine gives.
            again, _ = await asyncio.wait_for(tokens_of(submit(request("The capital of France is", 12))), 120)
        finally:
            scheduler.stop()
        fresh = Scheduler(device_engine(random_store), SchedulerConfig(max_batch=1, prefix_cache_bytes=0), name="fresh")
        try:
            handle = SequenceHandle(Sequence(request("The capital of France is", 12), tokenizer), loop)
            fresh.submit(handle)
            expected, _ = await asyncio.wait_for(tokens_of(handle), 120)
        finally:
            fresh.stop()
        assert again == expected
        return {"tokens_before_cancel": got, "steps_from_cancel_to_next_stream_done": steps_after}

    FIGURES["cancellation"] = asyncio.run(scenario())


def test_top1_agrees_with_the_cpu_graph(random_store, text_ids) -> None:
    ids = text_ids[: STEPS + 16]
    assert len(ids) == STEPS + 16, "the evaluation text is too short for TOKENWIRE_CUDA_TEST_STEPS"
    ref = teacher_forced(reference_engine(random_store), ids, 16)
    got = teacher_forced(device_engine(random_store), ids, 16)
    agree = ref.argmax(-1) == got.argmax(-1)
    top = np.sort(ref, -1)
    figures = {"positions": len(ref), "top1_agreement": float(agree.mean()),
               "max_abs_diff": float(np.abs(ref - got).max()),
               "median_abs_diff": float(np.median(np.abs(ref - got))),
               "disagreeing_positions": [int(i) for i in np.flatnonzero(~agree)][:20],
               "reference_margin_p5": float(np.percentile(top[:, -1] - top[:, -2], 5))}
    FIGURES["top1_vs_cpu_graph"] = figures
    print(json.dumps(figures))
    assert figures["top1_agreement"] >= MIN_TOP1_AGREEMENT, figures
