"""Sampling is a pure function of logits, parameters, history and the seed."""

from __future__ import annotations

import numpy as np
import pytest

from tokenwire.server.engine.sampling import SamplingConfig, TokenHistory, apply_penalties, sample


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def draw(logits: np.ndarray, config: SamplingConfig, n: int = 4000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray([sample(logits, config, rng)[0] for _ in range(n)])


def test_greedy_is_argmax_with_its_logprob() -> None:
    logits = logits_of([0.1, 0.6, 0.3])
    token, logprob = sample(logits, SamplingConfig(temperature=0.0), np.random.default_rng(0))
    assert token == 1
    assert logprob == pytest.approx(np.log(0.6), abs=1e-5)


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    config = SamplingConfig(temperature=1.0)
    a = draw(logits, config, 50, seed=7)
    b = draw(logits, config, 50, seed=7)
    c = draw(logits, config, 50, seed=8)
    assert (a == b).all()
    assert (a != c).any()


def test_unrestricted_sampling_follows_the_distribution() -> None:
    probs = [0.5, 0.3, 0.2]
    counts = np.bincount(draw(logits_of(probs), SamplingConfig()), minlength=3) / 4000
    assert np.allclose(counts, probs, atol=0.03)


def test_temperature_sharpens() -> None:
    logits = logits_of([0.5, 0.3, 0.2])
    cold = np.bincount(draw(logits, SamplingConfig(temperature=0.3)), minlength=3) / 4000
    assert cold[0] > 0.75


def test_top_k_keeps_only_k() -> None:
    tokens = draw(logits_of([0.4, 0.3, 0.2, 0.1]), SamplingConfig(top_k=2))
    assert set(tokens) == {0, 1}


def test_top_p_keeps_the_nucleus() -> None:
    # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 must never appear.
    tokens = draw(logits_of([0.5, 0.3, 0.15, 0.05]), SamplingConfig(top_p=0.8))
    assert set(tokens) == {0, 1}


def test_min_p_drops_unlikely_tokens() -> None:
    # min_p 0.5: keep tokens with p >= 0.5 * 0.5 = 0.25.
    tokens = draw(logits_of([0.5, 0.3, 0.15, 0.05]), SamplingConfig(min_p=0.5))
    assert set(tokens) == {0, 1}


def test_repetition_penalty_discourages_seen_tokens() -> None:
    logits = np.asarray([2.0, 1.9, -1.0], dtype=np.float32)
    history = TokenHistory([0])
    penalized = apply_penalties(logits, SamplingConfig(repetition_penalty=1.5), history)
    assert penalized[0] == pytest.approx(2.0 / 1.5)
    assert sample(logits, SamplingConfig(temperature=0, repetition_penalty=1.5), np.random.default_rng(0), history)[0] == 1
    history.add(2)
    assert apply_penalties(logits, SamplingConfig(repetition_penalty=1.5), history)[2] == pytest.approx(-1.5)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = np.zeros(3, dtype=np.float32)
    history = TokenHistory([])
    for t in (1, 1, 2):
        history.add(t)
    out = apply_penalties(logits, SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25), history)
    assert out.tolist() == pytest.approx([0.0, -1.0, -0.75])
    assert logits.tolist() == [0.0, 0.0, 0.0], "penalties must not modify the caller's logits"


@pytest.mark.parametrize(
    "config, field",
    [
        (SamplingConfig(temperature=-0.1), "temperature"),
        (SamplingConfig(top_p=0.0), "top_p"),
        (SamplingConfig(top_p=1.5), "top_p"),
        (SamplingConfig(top_k=-1), "top_k"),
        (SamplingConfig(min_p=1.0), "min_p"),
        (SamplingConfig(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingConfig(presence_penalty=3.0), "presence_penalty"),
    ],
)
def test_out_of_range_parameters_are_named(config: SamplingConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        config.validate()


@pytest.mark.parametrize("temperature", [1e-39, 1e-20, 1e-6])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tiny_temperatures_are_greedy_not_nan(temperature: float, top_p: float) -> None:
    logits = np.random.default_rng(3).normal(size=1000).astype(np.float32) * 5
    token, logprob = sample(logits, SamplingConfig(temperature=temperature, top_p=top_p), np.random.default_rng(0))
    assert token == int(np.argmax(logits)) and np.isfinite(logprob)
