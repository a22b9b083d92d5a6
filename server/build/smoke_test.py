"""The smoke test a model must pass before it enters the store.

Load it as the server would (onnxruntime session, tokenizer; a fast graph through the engine the
server opens for it, e.g. PagedEngine), then greedy-decode a few tokens twice: with the KV cache
(prefill, then one token at a time) and without it (the whole sequence recomputed each step). A graph whose cache is wired wrongly, or whose logits are
not finite, gives different tokens or fails here instead of in front of a user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenwire.server.engine.batch_engine import BatchEngine
from tokenwire.server.engine.graph import is_fast_graph, open_engine
from tokenwire.server.engine.optimum_engine import OptimumEngine
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.models.process_memory import release_free_memory

SMOKE_PROMPT = "The capital of France is"
SMOKE_STEPS = 8
# Largest |cached - recomputed| logit difference, relative to the largest logit. Measured: fp32
# 1e-6, SmolLM2 int4 3e-6; a cache that drops its values differs by 10% or more.
LOGIT_TOLERANCE = 1e-3


class SmokeTestFailed(RuntimeError):
    """The model loads badly or decodes inconsistently; the message says how."""


@dataclass
class SmokeResult:
    prompt: str
    tokens: list[int]
    text: str
    max_logit_diff: float  # cache vs recompute, over every step
    seconds: float


def greedy_with_cache(engine: BatchEngine, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding of one sequence through the engine's KV cache (prefill, then a step a token)."""
    engine.reset()
    state = engine.new_prefill()
    logits = engine.prefill(state, ids)
    engine.join(state)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(np.array(logits))  # a copy: an engine may reuse its output buffer
        token = int(np.argmax(logits))
        tokens.append(token)
        logits = engine.step([token])[0]
    engine.reset()
    return tokens, all_logits


def recomputed_last(engine: BatchEngine, seq: list[int]) -> np.ndarray:
    """The last position's logits of `seq` computed from nothing (no cache kept)."""
    if isinstance(engine, OptimumEngine):
        return engine.full_logits(seq)[-1]
    engine.reset()
    state = engine.new_prefill()
    logits = np.array(engine.prefill(state, seq))
    engine.end_prefill(state)
    return logits


def greedy_recompute(engine: BatchEngine, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    seq = list(ids)
    tokens, all_logits = [], []
    for _ in range(steps):
        logits = recomputed_last(engine, seq)
        all_logits.append(logits)
        token = int(np.argmax(logits))
        tokens.append(token)
        seq.append(token)
    return tokens, all_logits


def smoke_test(folder: Path, prompt: str = SMOKE_PROMPT, steps: int = SMOKE_STEPS) -> SmokeResult:
    started = time.perf_counter()
    try:
        bundle = TokenizerBundle(folder)
    except Exception as exc:
        raise SmokeTestFailed(f"cannot read the tokenizer (tokenizer.json): {exc}") from exc
    ids = bundle.encode(prompt)
    if not ids:
        raise SmokeTestFailed(f"the tokenizer encodes {prompt!r} to no tokens")
    # Only its plain tokenizer is needed from here on (decode); the bundle's second copy and what
    # parsing tokenizer.json took are given back before the weights load (gemma3's 262k tokens:
    # 470 MB resident with the bundle, 140 MB after).
    tokenizer, bundle = bundle.tokenizer, None
    release_free_memory()
    try:
        engine = open_engine(folder)[0] if is_fast_graph(folder) else OptimumEngine(folder / "model.onnx")
    except Exception as exc:  # onnxruntime raises its own kinds
        raise SmokeTestFailed(f"onnxruntime cannot load the model's graph: {exc}") from exc
    try:
        cached, cached_logits = greedy_with_cache(engine, ids, steps)
        full, full_logits = greedy_recompute(engine, ids, steps)
    except Exception as exc:
        raise SmokeTestFailed(f"decoding failed: {type(exc).__name__}: {exc}") from exc
    if not all(np.isfinite(x).all() for x in cached_logits + full_logits):
        raise SmokeTestFailed("the model produces NaN or infinite logits")
    if cached != full:
        step = next(i for i, (a, b) in enumerate(zip(cached, full, strict=True)) if a != b)
        raise SmokeTestFailed(
            f"greedy decoding differs with and without the KV cache from step {step}: "
            f"with cache {cached}, recomputed {full} (the graph's past/present tensors are not wired as "
            "optimum's text-generation-with-past export wires them)"
        )
    diff = max(float(np.abs(a - b).max()) for a, b in zip(cached_logits, full_logits, strict=True))
    scale = max(float(np.abs(x).max()) for x in full_logits)
    if diff > LOGIT_TOLERANCE * max(scale, 1.0):
        raise SmokeTestFailed(
            f"logits differ with and without the KV cache by up to {diff:.3g} (largest logit {scale:.3g}), "
            "though the greedy tokens agree: the cache is not wired as optimum's text-generation-with-past "
            "export wires it"
        )
    return SmokeResult(prompt, cached, tokenizer.decode(cached, skip_special_tokens=True), diff,
                       time.perf_counter() - started)
