"""What mutation testing found unpinned in sampling.py: the untruncated inverse-CDF draw, the
float64 sums behind every log-probability, log_softmax on rows, tie order at the truncation
boundary, the probabilities of the kept tokens, the degenerate-logit fallback and the exact
conditions that switch each penalty on.

References are computed here in float64 from the definitions, never copied from a run.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from tokenwire.server.engine.sampling import (
    SamplingConfig,
    TokenHistory,
    apply_penalties,
    log_softmax,
    sample,
)


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, the textbook way."""
    x = np.asarray(x, dtype=np.float64)
    s = x - x.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


class ScriptedRng:
    """Stands in for np.random.Generator where only `random()` may be called: returns the given
    uniforms in order. Any other method (e.g. `choice`) is missing, so using it fails the test."""

    def __init__(self, *uniforms: float) -> None:
        self.uniforms = list(uniforms)
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.uniforms.pop(0)


def scripted(*uniforms: float) -> np.random.Generator:
    return cast(np.random.Generator, ScriptedRng(*uniforms))


def drawn_counts(logits: np.ndarray, config: SamplingConfig, n: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount([sample(logits, config, rng)[0] for _ in range(n)], minlength=logits.shape[0])


# A confident distribution over a 4097-token vocabulary: the top token, then 4096 tokens of weight
# 4e-8 each (< half a float32 ulp of 1.0). Their mass, 1.6e-4, vanishes from a float32 running sum
# and partly from a float32 pairwise sum; a float64 sum keeps it.
TAIL = 4096
CONFIDENT = np.concatenate([[0.0], np.full(TAIL, np.log(4e-8))]).astype(np.float32)


def confident_top_logprob() -> float:
    return float(ref_log_softmax(CONFIDENT)[0])


# -- the untruncated draw: inverse CDF of one uniform over the token ids in order -------------

@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.8])
def test_untruncated_draw_is_the_inverse_cdf_of_one_uniform(temperature: float) -> None:
    """With no top-k/top-p/min-p, a draw takes exactly one rng.random() u and returns the first
    token id whose cumulative probability exceeds u (ids in order), with its log-probability."""
    logits = np.asarray([0.5, 1.0, -1.0, 2.0, 0.0], dtype=np.float32)
    probs = np.exp(ref_log_softmax(logits / temperature))
    cdf = np.cumsum(probs)
    for token in range(logits.shape[0]):
        low = cdf[token - 1] if token else 0.0
        u = (low + cdf[token]) / 2  # the middle of the token's interval
        rng = ScriptedRng(u)
        got, logprob = sample(logits, SamplingConfig(temperature=temperature), cast(np.random.Generator, rng))
        assert got == token
        assert rng.calls == 1
        assert logprob == pytest.approx(np.log(probs[token]), abs=1e-6)


def test_untruncated_draw_at_u_zero_skips_impossible_tokens() -> None:
    """u = 0 (rng.random() may return it) never picks a token of probability 0 (logit -inf):
    the first token whose cumulative weight is strictly above u*total."""
    logits = np.asarray([-np.inf, -np.inf, 0.0, 1.0], dtype=np.float32)
    token, logprob = sample(logits, SamplingConfig(), scripted(0.0))
    assert token == 2
    assert logprob == pytest.approx(ref_log_softmax(logits)[2], abs=1e-6)


def test_untruncated_draw_stays_in_the_vocabulary_on_degenerate_logits() -> None:
    """An overflowed (+inf) logit makes every weight NaN: the token id still lies in the vocabulary."""
    logits = np.asarray([0.0, np.inf, 0.0, 0.0], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        for seed in range(5):
            token, _ = sample(logits, SamplingConfig(), np.random.default_rng(seed))
            assert 0 <= token < logits.shape[0]


# -- float64 sums: a confident distribution keeps its tail mass in every log-probability -------

def test_greedy_logprob_sums_in_float64() -> None:
    """Greedy: the top token's log-probability counts the 4096 tiny tail tokens."""
    token, logprob = sample(CONFIDENT, SamplingConfig(temperature=0.0), np.random.default_rng(0))
    assert token == 0
    assert logprob == pytest.approx(confident_top_logprob(), rel=1e-5)


def test_untruncated_logprob_sums_in_float64() -> None:
    """The untruncated draw's normaliser is a float64 cumulative sum: the tail is not lost."""
    token, logprob = sample(CONFIDENT, SamplingConfig(), scripted(0.5))
    assert token == 0
    assert logprob == pytest.approx(confident_top_logprob(), rel=1e-5)


@pytest.mark.parametrize("config", [SamplingConfig(top_p=0.999), SamplingConfig(min_p=1e-9),
                                    SamplingConfig(top_k=TAIL)])
def test_truncated_logprob_sums_in_float64(config: SamplingConfig) -> None:
    """With truncation the reported log-probability is still that of the full distribution."""
    token, logprob = sample(CONFIDENT, config, np.random.default_rng(0))
    assert token == 0
    assert logprob == pytest.approx(confident_top_logprob(), rel=1e-5)


# -- log_softmax: over the last axis, float64 sum, the input's dtype ---------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_is_per_row(dtype: type) -> None:
    """Each row is normalised on its own, even when rows differ by 1000 in scale (quality.py
    passes [tokens, vocab] blocks); the result keeps the input's dtype."""
    x = np.asarray([[1000.0, 999.0, 990.0], [0.0, -1.0, -2.0], [-50.0, -50.0, -49.0]], dtype=dtype)
    out = log_softmax(x)
    assert out.dtype == dtype
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref_log_softmax(x), rtol=1e-6, atol=1e-6)


def test_log_softmax_wide_rows_are_not_transposed() -> None:
    """A 2 x 5 block: per-row results, shape kept (a sum without keepdims would not broadcast)."""
    x = np.arange(10, dtype=np.float32).reshape(2, 5) * np.asarray([[1.0], [-3.0]], dtype=np.float32)
    np.testing.assert_allclose(log_softmax(x), ref_log_softmax(x), rtol=1e-6, atol=1e-6)


def test_log_softmax_sums_in_float64() -> None:
    """The normaliser of a float32 row is summed in float64: the tiny tail is counted."""
    out = log_softmax(CONFIDENT)
    assert out.dtype == np.float32
    assert float(out[0]) == pytest.approx(confident_top_logprob(), rel=1e-5)


# -- ties at the truncation boundary: the lower token ids are kept ----------------------------

@pytest.mark.parametrize("top_k", [0, 40])
def test_tied_candidates_at_the_nucleus_boundary_keep_the_lowest_ids(top_k: int) -> None:
    """20 tokens tie for the top (the odd ids of 40): top_p 0.3 needs 7 of them, and those are
    the 7 lowest ids (a stable sort by probability, candidates in id order; top_k equal to the
    vocabulary truncates nothing and changes nothing)."""
    logits = np.tile(np.asarray([0.0, 5.0], dtype=np.float32), 20)
    p_top = float(np.exp(ref_log_softmax(logits))[1])
    needed = int(np.ceil(0.3 / p_top))
    assert needed == 7
    counts = drawn_counts(logits, SamplingConfig(top_p=0.3, top_k=top_k), 700)
    assert set(np.flatnonzero(counts).tolist()) == {1, 3, 5, 7, 9, 11, 13}


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_keeps_exactly_the_k_likeliest(top_k: int) -> None:
    """Exactly the k largest of 300 logits are ever drawn, all of them (k far below vocab/2)."""
    logits = np.random.default_rng(4).normal(size=300).astype(np.float32)
    best = set(np.argsort(-logits)[:top_k].tolist())
    counts = drawn_counts(logits, SamplingConfig(top_k=top_k, temperature=3.0), 600)
    assert set(np.flatnonzero(counts).tolist()) == best


def test_min_p_keeps_a_token_exactly_at_the_threshold() -> None:
    """A token whose probability is exactly min_p times the top token's (in the float32
    log-probabilities sampling works in) is kept: the rule is >=."""
    logits = np.asarray([0.0, np.log(0.25)], dtype=np.float32)
    lp = log_softmax(logits)
    ratio = float(np.exp(lp[1] - lp[0]))
    assert ratio == pytest.approx(0.25, rel=1e-6)
    counts = drawn_counts(logits, SamplingConfig(min_p=ratio), 300)
    assert counts[1] > 0
    counts = drawn_counts(logits, SamplingConfig(min_p=float(np.nextafter(np.float32(ratio), np.float32(1)))), 300)
    assert counts[1] == 0


# -- the kept tokens are drawn in proportion to their probabilities ---------------------------

@pytest.mark.parametrize("config", [SamplingConfig(top_k=2), SamplingConfig(min_p=0.4),
                                    SamplingConfig(top_p=0.85)])
def test_kept_tokens_keep_their_relative_probabilities(config: SamplingConfig) -> None:
    """Truncation to {0, 1} of [0.6, 0.3, 0.1] renormalises: token 0 comes 2/3 of the time, not 1/2."""
    n = 3000
    counts = drawn_counts(np.log(np.asarray([0.6, 0.3, 0.1])).astype(np.float32), config, n)
    assert counts[2] == 0
    assert counts[0] / n == pytest.approx(2 / 3, abs=0.04)


# -- degenerate logits with truncation fall back to argmax ------------------------------------

@pytest.mark.parametrize("config", [SamplingConfig(top_p=0.9), SamplingConfig(min_p=0.1),
                                    SamplingConfig(top_k=2)])
@pytest.mark.parametrize("logits", [[0.0, np.inf, 1.0], [-np.inf, -np.inf, -np.inf]])
def test_truncated_draw_falls_back_to_argmax_on_degenerate_logits(config: SamplingConfig,
                                                                  logits: list[float]) -> None:
    """An overflowed (+inf) logit, or every logit -inf, leaves no finite distribution: the
    token is the argmax of the logits and the log-probability a float."""
    x = np.asarray(logits, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        token, logprob = sample(x, config, np.random.default_rng(0))
    assert token == int(np.argmax(x))
    assert isinstance(logprob, float)


# -- penalties: when each applies, and their values -------------------------------------------

def test_repetition_penalty_divides_every_positive_logit_even_below_one() -> None:
    """'Positive' means > 0, not > 1: 0.5 and 0.25 are divided, -0.5 multiplied."""
    logits = np.asarray([0.5, -0.5, 0.25, 0.75], dtype=np.float32)
    out = apply_penalties(logits, SamplingConfig(repetition_penalty=2.0), TokenHistory([0, 1, 2]))
    assert out.tolist() == [0.25, -1.0, 0.125, 0.75]


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"presence_penalty": 1.0}, [1.0, 1.0, 3.0, 3.0]),
    ({"frequency_penalty": 1.0}, [1.0, -1.0, 3.0, 3.0]),
])
def test_a_penalty_of_exactly_one_applies(kwargs: dict[str, float], expected: list[float]) -> None:
    """presence/frequency 1.0 are penalties like any other non-zero value (output 1 x3, 3 x1)."""
    logits = np.asarray([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    history = TokenHistory([0])
    for t in (1, 1, 1, 3):
        history.add(t)
    assert apply_penalties(logits, SamplingConfig(**kwargs), history).tolist() == expected


def test_no_penalty_returns_the_logits_themselves_despite_history() -> None:
    """Default parameters with a prompt and output so far: nothing to apply, no copy made."""
    logits = np.asarray([1.0, 2.0, 3.0], dtype=np.float32)
    history = TokenHistory([0, 1])
    history.add(2)
    assert apply_penalties(logits, SamplingConfig(), history) is logits


def test_penalised_copy_is_float32() -> None:
    """Half-precision logits come back as a float32 copy (the precision and the dtype the rest of
    sampling works in), not float64 (twice the memory per step) nor float16."""
    logits = np.asarray([1.0, 2.0, 3.0], dtype=np.float16)
    history = TokenHistory([1])
    history.add(2)
    for config in (SamplingConfig(repetition_penalty=1.3), SamplingConfig(frequency_penalty=0.5)):
        out = apply_penalties(logits, config, history)
        assert out.dtype == np.float32
        assert logits.tolist() == [1.0, 2.0, 3.0]


# ---- degenerate logits on every path (bugs this file's mutation run found) ----------------------

DEGENERATE_CONFIGS = [SamplingConfig(), SamplingConfig(top_p=0.9), SamplingConfig(top_k=2),
                      SamplingConfig(min_p=0.1), SamplingConfig(temperature=0.0)]


@pytest.mark.parametrize("config", DEGENERATE_CONFIGS)
def test_a_plus_inf_logit_is_certain_on_every_path(config: SamplingConfig) -> None:
    token, logprob = sample(np.array([0, np.inf, 0, 0], np.float32), config, np.random.default_rng(0))
    assert (token, logprob) == (1, 0.0)  # was (3, nan) without truncation


@pytest.mark.parametrize("config", DEGENERATE_CONFIGS)
def test_a_nan_logit_is_impossible_on_every_path(config: SamplingConfig) -> None:
    logits = np.array([1.0, np.nan, 3.0, 0.0], np.float32)
    token, logprob = sample(logits, config, np.random.default_rng(0))  # top_p raised IndexError here
    finite = np.array([1.0, 3.0, 0.0])
    assert token == 2 and logprob == pytest.approx(3.0 - np.log(np.exp(finite).sum()))


def test_nothing_possible_takes_the_first_token_and_says_so() -> None:
    token, logprob = sample(np.full(4, -np.inf, np.float32), SamplingConfig(), np.random.default_rng(0))
    assert token == 0 and logprob == -np.inf  # the stream sends a null logprob for it


def test_impossible_tokens_alone_are_not_degenerate() -> None:
    """-inf marks tokens a grammar forbids: the draw stays random among the others."""
    logits = np.array([-np.inf, 0.0, 0.0, -np.inf], np.float32)
    drawn = {sample(logits, SamplingConfig(), np.random.default_rng(seed))[0] for seed in range(40)}
    assert drawn == {1, 2}
