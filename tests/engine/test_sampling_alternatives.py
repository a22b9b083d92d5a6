"""logit_bias and top_logprobs in sampling (fast, numpy only): the bias lands on exactly its ids and
is checked against range and vocabulary; the alternatives are the k likeliest of the distribution the
token is drawn from (after penalties, bias and temperature), with log_softmax values, likeliest first."""

from __future__ import annotations

import numpy as np
import pytest

from tokenwire.server.engine.sampling import (
    SamplingConfig,
    SamplingError,
    TokenHistory,
    adjusted,
    apply_bias,
    log_softmax,
    sample,
    top_logprobs,
)

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.0], dtype=np.float32)


def test_the_bias_lands_on_its_ids_only() -> None:
    config = SamplingConfig(logit_bias=((1, 5.0), (4, -100.0)))
    biased = apply_bias(LOGITS, config)
    assert biased.tolist() == pytest.approx([2.0, 6.0, 0.5, -1.0, -97.0, 0.0])
    assert LOGITS[1] == 1.0, "the caller's logits are not changed"
    assert apply_bias(LOGITS, SamplingConfig()) is LOGITS, "no copy without a bias"
    assert sample(LOGITS, SamplingConfig(temperature=0.0, logit_bias=((4, -100.0),)), np.random.default_rng(0))[0] == 0
    assert sample(LOGITS, SamplingConfig(temperature=0.0, logit_bias=((3, 100.0),)), np.random.default_rng(0))[0] == 3


def test_penalties_come_before_the_bias() -> None:
    history = TokenHistory([])
    history.add(4)
    config = SamplingConfig(presence_penalty=2.0, logit_bias=((4, 1.0),))
    assert adjusted(LOGITS, config, history)[4] == pytest.approx(3.0 - 2.0 + 1.0)
    assert adjusted(LOGITS, config, None)[4] == pytest.approx(4.0)


@pytest.mark.parametrize(("bias", "words"), [(((1, 100.5),), "must be in [-100, 100], got 100.5"),
                                             (((1, -101.0),), "must be in [-100, 100]"),
                                             (tuple((i, 1.0) for i in range(1025)), "at most 1024 tokens, got 1025")])
def test_a_bias_out_of_range_is_refused(bias, words: str) -> None:
    with pytest.raises(SamplingError) as caught:
        SamplingConfig(logit_bias=bias).validate()
    assert caught.value.field == "logit_bias" and words in str(caught.value)


def test_the_vocabulary_bounds_the_ids() -> None:
    SamplingConfig(logit_bias=((0, 1.0), (5, 1.0))).check_vocabulary(6)
    SamplingConfig(logit_bias=((0, 100.0), (1, -100.0))).validate()  # the bounds themselves are allowed
    with pytest.raises(SamplingError, match="names token 6; the model's vocabulary has ids 0 to 5"):
        SamplingConfig(logit_bias=((6, 1.0),)).check_vocabulary(6)
    with pytest.raises(SamplingError, match="names token -1"):
        SamplingConfig(logit_bias=((-1, 1.0),)).check_vocabulary(6)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_alternatives_are_the_likeliest_of_the_sampled_distribution(temperature: float) -> None:
    config = SamplingConfig(temperature=temperature, logit_bias=((5, 2.5),))
    scale = 1.0 if temperature == 0.0 else 1.0 / temperature
    reference = log_softmax(apply_bias(LOGITS, config).astype(np.float64) * scale)
    got = top_logprobs(LOGITS, config, None, 3)
    order = [int(i) for i in np.argsort(-reference, kind="stable")[:3]]
    assert [t for t, _ in got] == order
    assert [lp for _, lp in got] == pytest.approx([float(reference[i]) for i in order], abs=1e-6)
    token, logprob = sample(LOGITS, config, np.random.default_rng(1))
    if token in order:  # the chosen token's logprob is the same number
        assert dict(got)[token] == pytest.approx(logprob, abs=1e-5)


def test_alternatives_skip_what_cannot_be_sampled() -> None:
    masked = LOGITS.copy()
    masked[[0, 4]] = -np.inf
    got = top_logprobs(masked, SamplingConfig(), None, 6)
    assert [t for t, _ in got] == [1, 2, 5, 3] and all(np.isfinite(lp) for _, lp in got)
    assert top_logprobs(np.full(6, -np.inf, dtype=np.float32), SamplingConfig(), None, 2) == []
    assert len(top_logprobs(LOGITS, SamplingConfig(), None, 50)) == 6


def test_bounds_and_fields_of_the_checks() -> None:
    SamplingConfig(logit_bias=tuple((i, 1.0) for i in range(1024))).validate()  # 1024 is allowed
    with pytest.raises(SamplingError) as caught:
        SamplingConfig(logit_bias=((9, 1.0),)).check_vocabulary(6)
    assert caught.value.field == "logit_bias"


def test_alternatives_see_the_penalties_and_skip_nan() -> None:
    history = TokenHistory([])
    history.add(4)
    penalised = top_logprobs(LOGITS, SamplingConfig(presence_penalty=1.5), history, 2)
    assert [t for t, _ in penalised] == [0, 4], "token 4 falls from first (3.0) to second (1.5)"
    assert [t for t, _ in top_logprobs(LOGITS, SamplingConfig(), None, 1)] == [4]
    with_nan = LOGITS.copy()
    with_nan[2] = np.nan
    assert [t for t, _ in top_logprobs(with_nan, SamplingConfig(), None, 6)] == [4, 0, 1, 5, 3], "NaN is impossible"


def test_alternatives_of_a_wide_vocabulary_are_exactly_the_top_k() -> None:
    logits = np.random.default_rng(5).standard_normal(500).astype(np.float32) * 3
    for k in (1, 5, 20):
        assert [t for t, _ in top_logprobs(logits, SamplingConfig(), None, k)] == [
            int(i) for i in np.argsort(-logits, kind="stable")[:k]]
