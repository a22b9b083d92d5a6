"""Exact edges of sampling.py: which field validate() names, the logprob at temperature > 0,
overflow, each penalty alone, top_k=1, top_p / min_p membership."""

from __future__ import annotations

import numpy as np
import pytest

from tokenwire.server.engine.sampling import (
    SamplingConfig,
    SamplingError,
    TokenHistory,
    apply_penalties,
    sample,
)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    s = x - x.max()
    return s - np.log(np.exp(s).sum())


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.0001}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 10.0001}, "repetition_penalty"),
    ({"presence_penalty": 2.0001}, "presence_penalty"),
    ({"presence_penalty": -2.0001}, "presence_penalty"),
    ({"frequency_penalty": 2.0001}, "frequency_penalty"),
    ({"frequency_penalty": -2.0001}, "frequency_penalty"),
])
def test_validate_names_the_field(kwargs, field) -> None:
    with pytest.raises(SamplingError) as exc:
        SamplingConfig(**kwargs).validate()
    assert exc.value.field == field
    assert field in str(exc.value)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0}, {"top_p": 1.0}, {"top_k": 0}, {"min_p": 0.0}, {"repetition_penalty": 10.0},
    {"presence_penalty": 2.0}, {"presence_penalty": -2.0}, {"frequency_penalty": 2.0},
    {"frequency_penalty": -2.0}, {"min_p": 0.999}, {"top_p": 1e-9},
])
def test_validate_accepts_the_bounds(kwargs) -> None:
    SamplingConfig(**kwargs).validate()


def test_first_bad_parameter_is_named() -> None:
    with pytest.raises(SamplingError) as exc:
        SamplingConfig(top_p=0.0, top_k=-1).validate()
    assert exc.value.field == "top_p"


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.5, top_k=3),
    SamplingConfig(temperature=0.5, top_p=0.9),
    SamplingConfig(temperature=2.0, min_p=0.05),
])
def test_logprob_at_temperature_is_log_softmax_of_scaled_logits(config) -> None:
    logits = np.asarray([1.0, 2.5, -0.5, 0.3, 2.0], dtype=np.float32)
    expected = np_log_softmax(logits / config.temperature)
    rng = np.random.default_rng(3)
    for _ in range(30):
        token, logprob = sample(logits, config, rng)
        assert logprob == pytest.approx(expected[token], abs=1e-5)


def test_greedy_logprob_exact() -> None:
    logits = np.asarray([1.0, 3.0, 2.0], dtype=np.float32)
    token, logprob = sample(logits, SamplingConfig(temperature=0.0), np.random.default_rng(0))
    assert token == 1
    assert logprob == pytest.approx(np_log_softmax(logits)[1], abs=1e-6)


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.5, top_k=2),
    SamplingConfig(temperature=1.0, top_p=0.9), SamplingConfig(temperature=1.0, min_p=0.1),
])
def test_large_logits_do_not_overflow(config) -> None:
    logits = np.asarray([1e4, 1e4 - 1.0, -1e4, 0.0], dtype=np.float32)
    expected = np_log_softmax(logits / config.temperature if config.temperature else logits)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for seed in range(20):
            token, logprob = sample(logits, config, np.random.default_rng(seed))
            assert token in (0, 1)
            assert np.isfinite(logprob)
            assert logprob == pytest.approx(expected[token], abs=1e-4)


def test_presence_penalty_alone_subtracts_once_per_seen_token() -> None:
    logits = np.asarray([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    history = TokenHistory([0])  # the prompt does not count for the additive penalties
    for t in (1, 1, 1, 3):
        history.add(t)
    out = apply_penalties(logits, SamplingConfig(presence_penalty=0.5), history)
    assert out.tolist() == [1.0, 1.5, 3.0, 3.5]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # a copy


def test_frequency_penalty_alone_subtracts_per_occurrence() -> None:
    logits = np.asarray([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    history = TokenHistory([0])
    for t in (1, 1, 1, 3):
        history.add(t)
    out = apply_penalties(logits, SamplingConfig(frequency_penalty=0.25), history)
    assert out.tolist() == [1.0, 1.25, 3.0, 3.75]


def test_presence_and_frequency_together_and_negative() -> None:
    logits = np.zeros(3, dtype=np.float32)
    history = TokenHistory([])
    for t in (2, 2):
        history.add(t)
    out = apply_penalties(logits, SamplingConfig(presence_penalty=-1.0, frequency_penalty=0.5), history)
    assert out.tolist() == [0.0, 0.0, 0.0]  # -(-1 + 0.5*2) = 0
    out = apply_penalties(logits, SamplingConfig(presence_penalty=1.0, frequency_penalty=0.5), history)
    assert out.tolist() == [0.0, 0.0, -2.0]


def test_additive_penalties_without_output_change_nothing() -> None:
    logits = np.asarray([1.0, 2.0], dtype=np.float32)
    out = apply_penalties(logits, SamplingConfig(presence_penalty=2.0, frequency_penalty=2.0), TokenHistory([0, 1]))
    assert out is logits


def test_repetition_penalty_below_one_divides_positive_and_multiplies_negative() -> None:
    logits = np.asarray([2.0, -2.0, 3.0, -3.0], dtype=np.float32)
    history = TokenHistory([0, 1])
    out = apply_penalties(logits, SamplingConfig(repetition_penalty=0.5), history)
    assert out.tolist() == [4.0, -1.0, 3.0, -3.0]
    out = apply_penalties(logits, SamplingConfig(repetition_penalty=2.0), history)
    assert out.tolist() == [1.0, -4.0, 3.0, -3.0]


def test_repetition_penalty_counts_output_tokens_and_zero_stays() -> None:
    logits = np.asarray([0.0, 2.0, 3.0], dtype=np.float32)
    history = TokenHistory([])
    history.add(0)
    history.add(2)
    out = apply_penalties(logits, SamplingConfig(repetition_penalty=1.5), history)
    assert out.tolist() == [0.0, 2.0, 2.0]


def test_top_k_one_is_greedy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32)
    best = int(np.argmax(logits))
    for seed in range(50):
        token, logprob = sample(logits, SamplingConfig(temperature=1.0, top_k=1), np.random.default_rng(seed))
        assert token == best
        assert logprob == pytest.approx(np_log_softmax(logits)[best], abs=1e-5)


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def drawn(logits: np.ndarray, config: SamplingConfig, n: int = 600) -> set[int]:
    rng = np.random.default_rng(11)
    return {sample(logits, config, rng)[0] for _ in range(n)}


@pytest.mark.parametrize(("top_p", "members"), [
    (0.4, {0}),          # 0.5 alone covers it
    (0.5, {0}),          # the smallest set whose mass reaches top_p: 0.5 reaches 0.5
    (0.55, {0, 1}),
    (0.8, {0, 1}),
    (0.81, {0, 1, 2}),
    (0.96, {0, 1, 2, 3}),
])
def test_top_p_nucleus_exact(top_p, members) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert drawn(logits_of(probs), SamplingConfig(top_p=top_p)) == members


@pytest.mark.parametrize(("min_p", "members"), [
    (0.61, {0}),          # 0.3 / 0.5 = 0.6 < 0.61
    (0.59, {0, 1}),
    (0.29, {0, 1, 2}),    # 0.15 / 0.5 = 0.3
    (0.31, {0, 1}),
    (0.09, {0, 1, 2, 3}),  # 0.05 / 0.5 = 0.1
])
def test_min_p_membership_exact(min_p, members) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert drawn(logits_of(probs), SamplingConfig(min_p=min_p)) == members
