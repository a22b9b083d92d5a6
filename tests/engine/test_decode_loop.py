"""The decode loop against references: no-cache recompute, transformers, and other architectures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenwire.server.build.smoke_test import greedy_recompute, greedy_with_cache
from tokenwire.server.engine.optimum_engine import OptimumEngine
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.sequence import FinishReason, Generation, GenerationRequest, TokenEvent
from tokenwire.server.engine.tokenizer import TokenizerBundle

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "smollm2_greedy.json"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 12 times 7?\nA:",
]


@pytest.fixture(scope="module")
def fp32(fp32_dir: Path) -> tuple[OptimumEngine, TokenizerBundle]:
    return OptimumEngine(fp32_dir / "model.onnx"), TokenizerBundle(fp32_dir)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_cache_matches_full_recompute_fp32(fp32, prompt: str) -> None:
    decoder, tok = fp32
    ids = tok.encode(prompt)
    cached, cached_logits = greedy_with_cache(decoder, ids, 20)
    full, full_logits = greedy_recompute(decoder, ids, 20)
    assert cached == full
    for step, (a, b) in enumerate(zip(cached_logits, full_logits, strict=True)):
        assert np.abs(a - b).max() < 1e-3, f"step {step}: logits differ by {np.abs(a - b).max()}"


def test_fast_graph_kv_cache_matches_full_recompute(int4_dir: Path) -> None:
    """The default int4 model's fast graph: in-place KV decoding vs recomputing the whole sequence."""
    from tokenwire.server.engine.fast_engine import FastEngine
    from tokenwire.server.engine.graph import is_fast_graph

    assert is_fast_graph(int4_dir), "the default int4 variant is built as the fast graph"
    tok = TokenizerBundle(int4_dir)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Name three colours."}]))
    cached_engine, full_engine = FastEngine(int4_dir, context_length=512), FastEngine(int4_dir, context_length=512)
    state = cached_engine.new_prefill()
    logits = cached_engine.prefill(state, ids)
    cached_engine.join(state)
    seq = list(ids)
    for step in range(16):
        recomputed = full_engine.prefill(full_engine.new_prefill(), seq)
        assert int(np.argmax(logits)) == int(np.argmax(recomputed)), f"step {step}"
        assert np.abs(logits - recomputed).max() < 5e-2
        token = int(np.argmax(logits))
        seq.append(token)
        logits = cached_engine.step([token])[0]
    assert cached_engine.lengths == [len(seq)]


def run_greedy(decoder: OptimumEngine, tok: TokenizerBundle, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    request = GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0))
    events = list(Generation(decoder, tok, request))
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    return tokens, events[-1].reason


def test_fp32_greedy_equals_transformers_reference(fp32) -> None:
    """tests/reference/make_reference.py ran transformers' generate() on the same weights."""
    decoder, tok = fp32
    reference = json.loads(REFERENCE.read_text())
    assert len(reference["cases"]) >= 5
    for case in reference["cases"]:
        text = tok.render_chat(case["messages"]) if "messages" in case else case["prompt"]
        ids = tok.encode(text)
        assert ids == case["prompt_ids"], "our tokenizer/template must give transformers' prompt ids"
        tokens, reason = run_greedy(decoder, tok, ids, reference["max_new_tokens"])
        assert tokens == case["output_ids"], f"diverged from transformers on {text[-40:]!r}"
        expected = FinishReason.LENGTH if len(tokens) == reference["max_new_tokens"] else FinishReason.STOP
        assert reason == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_architectures_decode_identically_with_and_without_cache(tiny_models, arch: str) -> None:
    folder = tiny_models[arch]
    decoder, tok = OptimumEngine(folder / "model.onnx"), TokenizerBundle(folder)
    ids = tok.encode("Hello there, how are you doing today?")
    cached, cached_logits = greedy_with_cache(decoder, ids, 12)
    full, full_logits = greedy_recompute(decoder, ids, 12)
    assert cached == full
    assert max(np.abs(a - b).max() for a, b in zip(cached_logits, full_logits, strict=True)) < 1e-3
    assert len(set(cached)) > 1, "a random model should not repeat one token forever"
    # And the full generation loop runs on it too.
    tokens, _ = run_greedy(decoder, tok, ids, 8)
    assert tokens == cached[: len(tokens)]
