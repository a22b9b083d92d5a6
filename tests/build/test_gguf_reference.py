"""The numpy reference forward of a GGUF (server/build/gguf_reference.py) against transformers.

Each transformers random model is written as a GGUF the way convert_hf_to_gguf.py writes it
(tests/gguf_fixtures.py: llama's Q/K permutation, gemma's 1 + w norms, tensor names from gguf's own
map); the reference reads the file alone. Equal logits prove our GGUF conventions and the reference
at once.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_fixtures import (
    ARCHS,
    BOS_ID,
    EOS_ID,
    dequantize,
    gguf_fixture,
    hf_fixture,
    quantize,
    vocab,
)

from tokenwire.server.build import gguf_reference
from tokenwire.server.build.gguf_reference import ReferenceModel, reference_logits

TOKENS = [int(t) for t in np.random.default_rng(7).integers(0, 384, 40)]
# Each architecture's file mixes tensor types (norms and biases stay F32); the fixture sets the
# transformers model to the file's dequantized weights, so the comparison stays exact.
CASES = {
    "llama": ({"linear": "Q4_K", "ffn_down": "Q6_K", "attn_v": "Q8_0", "token_embd": "Q8_0", "output": "Q6_K"},
              {"tie_word_embeddings": False}),
    "qwen2": ({"linear": "Q5_0", "attn_q": "Q4_0", "token_embd": "F16"}, {}),
    "qwen3": ({"linear": "Q5_K", "ffn_up": "Q4_1", "token_embd": "Q4_K", "output": "F32"}, {"tie_word_embeddings": False}),
    "phi3": ({"linear": "Q8_0", "attn_qkv": "Q5_1", "token_embd": "BF16", "output": "F16"}, {}),
    "gemma2": ({"linear": "Q4_K", "attn_output": "F32", "token_embd": "Q6_K"}, {}),
    "gemma3": ({"linear": "Q6_K", "ffn_gate": "F16", "token_embd": "Q8_0"}, {}),
}


def fixture_of(arch: str, **variant):
    qtypes, overrides = CASES[arch]
    return hf_fixture(arch, qtypes, **overrides, **variant)


def worst(ref: np.ndarray, truth: np.ndarray) -> float:
    """Largest absolute difference, relative to the logits' spread."""
    return float(np.abs(ref - truth).max() / truth.std())


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_equals_transformers(arch: str) -> None:
    fixture = fixture_of(arch)
    qtypes, _ = CASES[arch]
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(fixture.path).tensors}
    assert kinds["token_embd.weight"] == qtypes["token_embd"]
    assert kinds["blk.1.ffn_down.weight"] == qtypes.get("ffn_down", qtypes["linear"])
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in kinds) == (not fixture.model.config.tie_word_embeddings)
    if "output.weight" in kinds:
        assert kinds["output.weight"] == qtypes["output"]
    assert worst(reference_logits(fixture.path, TOKENS), fixture.logits(TOKENS)) < 2e-5


@pytest.mark.parametrize(("arch", "variant"), [
    # Llama 3.x rope: rope_freqs.weight divides some frequencies (the short original context mixes all three kinds)
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),  # the global layer only
    ("phi3", {"partial_rotary_factor": 0.5}),
])
def test_rope_variants(arch: str, variant: dict) -> None:
    fixture = fixture_of(arch, **variant)
    assert worst(reference_logits(fixture.path, TOKENS), fixture.logits(TOKENS)) < 2e-5
    plain = fixture_of(arch)  # the same weights: the variant must matter
    assert worst(reference_logits(plain.path, TOKENS), fixture.logits(TOKENS)) > 1e-2


def test_long_sequence_crosses_query_chunks() -> None:
    """More positions than one query chunk, and the sliding window many times over."""
    fixture = fixture_of("gemma2")
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 384, gguf_reference.QUERY_CHUNK + 60)]
    assert worst(reference_logits(fixture.path, tokens), fixture.logits(tokens)) < 5e-5


def test_float64() -> None:
    fixture = fixture_of("qwen3")
    r64 = reference_logits(fixture.path, TOKENS, dtype=np.float64)
    assert r64.dtype == np.float64
    assert worst(r64, fixture.logits(TOKENS)) < 2e-5


def test_wrong_conventions_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: half-split rope on llama's interleaved rows, or gemma read as a
    llama-like model (no embedding scale, SiLU), is far off."""
    llama = fixture_of("llama")
    monkeypatch.setattr(gguf_reference, "NEOX_ROPE", gguf_reference.NEOX_ROPE | {"llama"})
    assert worst(reference_logits(llama.path, TOKENS), llama.logits(TOKENS)) > 1e-2
    monkeypatch.undo()
    gemma = fixture_of("gemma3")
    monkeypatch.setattr(gguf_reference, "GEMMA", frozenset())
    assert worst(reference_logits(gemma.path, TOKENS), gemma.logits(TOKENS)) > 1e-2


# --- the torch-free fixtures themselves -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_random_fixture_runs(arch: str) -> None:
    path = gguf_fixture(arch, qtypes={"linear": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0"})
    model = ReferenceModel(path)
    assert model.hp.arch == arch and model.hp.n_vocab == len(vocab().tokens)
    logits = model.logits(TOKENS[:20])
    assert logits.shape == (20, model.hp.n_vocab) and np.isfinite(logits).all()
    assert logits.std() > 1.0  # not flat: greedy choices are not ties
    # causal: a prefix's logits do not depend on what follows it
    np.testing.assert_allclose(model.logits(TOKENS[:7]), logits[:7], rtol=1e-4, atol=1e-4)


def test_tokenizer_metadata() -> None:
    import tokenizers

    reader = gguf.GGUFReader(gguf_fixture("llama"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    v = vocab()
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens") == list(v.tokens)
    assert field("tokenizer.ggml.merges") == list(v.merges)
    assert field("tokenizer.ggml.bos_token_id") == BOS_ID and field("tokenizer.ggml.eos_token_id") == EOS_ID
    assert field("tokenizer.ggml.token_type")[:3] == [int(gguf.TokenType.CONTROL)] * 3
    assert "<|im_start|>" in field("tokenizer.chat_template")
    tok = tokenizers.Tokenizer.from_str(v.tokenizer_json())
    text = "The assert statement, with émigré café.\n"
    ids = tok.encode(text).ids
    assert len(ids) < len(text.encode()) and tok.decode(ids) == text


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quantizers_are_faithful(qtype: str) -> None:
    """Our K-quant blocks read back through gguf-py's dequantizer close to what was quantized."""
    w = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    back = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
    bound = {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype]
    assert np.abs(back - w).mean() / np.abs(w).mean() < bound
