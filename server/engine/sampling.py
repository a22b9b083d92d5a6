"""Choosing the next token: a pure function of the logits, the parameters and the history."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # (token id, bias) pairs added to the logits (OpenAI's logit_bias), each bias in [-100, 100].
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        # Below 1e-5 the scaled logits overflow float32 (inf - inf = NaN); such a temperature
        # means "the likeliest token" anyway.
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Raises SamplingError naming the first parameter out of range."""
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError("top_k", f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 <= self.min_p < 1.0):
            raise SamplingError("min_p", f"min_p must be in [0, 1), got {self.min_p}")
        if not (0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            # Beyond the bound every seen token's logit is 0 or -inf: nothing left to sample (NaN).
            raise SamplingError("repetition_penalty", f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                                                      f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2.0 <= value <= 2.0):
                raise SamplingError(name, f"{name} must be in [-2, 2], got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingError("logit_bias", f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens, got "
                                              f"{len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not (-100.0 <= bias <= 100.0):
                raise SamplingError("logit_bias", f"logit_bias of token {token} must be in [-100, 100], got {bias}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raises SamplingError when logit_bias names a token the model does not have."""
        for token, _ in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise SamplingError("logit_bias", f"logit_bias names token {token}; the model's vocabulary has "
                                                  f"ids 0 to {vocab_size - 1}")


MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20


class SamplingError(ValueError):
    """A sampling parameter out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TokenHistory:
    """Counts of the tokens seen so far, for the penalties (kept incrementally, no per-step scans)."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt = set(prompt_ids)
        self.output_counts: dict[int, int] = {}

    def add(self, token_id: int) -> None:
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1


def apply_penalties(logits: np.ndarray, config: SamplingConfig, history: TokenHistory) -> np.ndarray:
    """Returns logits with the penalties applied (a copy only when some penalty is on)."""
    rep = config.repetition_penalty != 1.0
    additive = config.presence_penalty != 0.0 or config.frequency_penalty != 0.0
    if not (rep and (history.prompt or history.output_counts)) and not (additive and history.output_counts):
        return logits
    logits = logits.astype(np.float32, copy=True)
    if rep:
        seen = np.fromiter(history.prompt | history.output_counts.keys(), dtype=np.int64)
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / config.repetition_penalty, values * config.repetition_penalty)
    if additive and history.output_counts:
        ids = np.fromiter(history.output_counts.keys(), dtype=np.int64)
        counts = np.fromiter(history.output_counts.values(), dtype=np.float32)
        logits[ids] -= config.presence_penalty + config.frequency_penalty * counts
    return logits


def apply_bias(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Returns logits with logit_bias added (a copy only when there is a bias)."""
    if not config.logit_bias:
        return logits
    logits = logits.astype(np.float32, copy=True)
    ids = np.fromiter((t for t, _ in config.logit_bias), dtype=np.int64)
    logits[ids] += np.fromiter((b for _, b in config.logit_bias), dtype=np.float32)
    return logits


def adjusted(logits: np.ndarray, config: SamplingConfig, history: TokenHistory | None) -> np.ndarray:
    """The logits sampling draws from, before temperature: penalties, then the bias."""
    if history is not None:
        logits = apply_penalties(logits, config, history)
    return apply_bias(logits, config)


def top_logprobs(logits: np.ndarray, config: SamplingConfig, history: TokenHistory | None,
                 k: int) -> list[tuple[int, float]]:
    """The k likeliest (token, logprob) of the distribution `sample` draws from (after penalties,
    bias and temperature, before truncation: the logprobs it reports), likeliest first."""
    scaled = adjusted(logits, config, history).astype(np.float64)
    if not config.greedy:
        scaled = scaled / config.temperature
    scaled = np.where(np.isnan(scaled), -np.inf, scaled)
    if not np.isfinite(scaled.max()):
        return []
    k = min(k, scaled.shape[0])
    best = np.argpartition(-scaled, k - 1)[:k]
    best = best[np.argsort(-scaled[best], kind="stable")]
    lse = scaled.max() + np.log(np.exp(scaled - scaled.max()).sum())
    return [(int(t), float(scaled[t] - lse)) for t in best if np.isfinite(scaled[t])]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, summed in float64, in x's own dtype."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(x.dtype)


def _degenerate(logits: np.ndarray) -> tuple[int, float]:
    """Logits with inf or NaN (a model's overflow, an extreme penalty): the likeliest token that is a
    number is taken, as greedy would (NaN counts as impossible; +inf ties go to the lowest id); its
    log-probability is 0 when it is certain (+inf), else that of the finite logits' distribution.
    Every sampling path takes this, so none draws an impossible token or raises (found by mutation
    testing: the untruncated path returned the last id, top_p raised IndexError on NaN)."""
    clean = np.where(np.isnan(logits), -np.inf, logits).astype(np.float64)
    token = int(np.argmax(clean))
    top = clean[token]
    if top == np.inf:
        return token, 0.0
    if top == -np.inf:  # nothing is possible: the first token, and say so
        return token, -np.inf
    return token, -float(np.log(np.exp(clean - top).sum()))


def sample(
    logits: np.ndarray,
    config: SamplingConfig,
    rng: np.random.Generator,
    history: TokenHistory | None = None,
) -> tuple[int, float]:
    """Picks the next token from `logits` [vocab]; returns (token id, its log-probability).

    The log-probability is that of the distribution the token was drawn from, after penalties
    and temperature but before truncation (top-k/top-p/min-p), as OpenAI reports it.
    """
    logits = adjusted(logits, config, history)
    # -inf is a token made impossible (a grammar's mask, a model's own): fine. NaN or +inf, or nothing
    # possible at all, is degenerate.
    # One pass: the max is NaN if any logit is, +inf if any is, -inf if all are.
    if not np.isfinite(np.max(logits)):
        return _degenerate(logits)
    if config.greedy:
        token = int(np.argmax(logits))
        # In float64, as top_logprobs computes it: the chosen token's logprob equals its entry there
        # (float32 exp rounds differently across CPUs' numpy kernels).
        wide = logits.astype(np.float64)
        return token, -float(np.log(np.exp(wide - wide[token]).sum()))

    scaled = logits.astype(np.float32, copy=False) * np.float32(1.0 / config.temperature)
    if config.top_k == 0 and config.top_p >= 1.0 and config.min_p == 0.0:
        # No truncation: draw from the whole distribution (inverse CDF, no sort, float32 throughout).
        weights = np.exp(scaled - scaled.max())
        cdf = np.cumsum(weights, dtype=np.float64)
        token = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), cdf.shape[0] - 1))
        return token, float(np.log(weights[token] / cdf[-1]))
    full_logprobs = log_softmax(scaled)
    # Candidates: the top-k (or every token), sorted by descending logit.
    if 0 < config.top_k < scaled.shape[0]:
        cand = np.argpartition(scaled, -config.top_k)[-config.top_k :]
    else:
        # Tokens more than e^30 less likely than the best hold < 1e-8 of the mass together:
        # leaving them out of the sort changes no top-p/min-p choice that matters.
        cand = np.flatnonzero(scaled >= scaled.max() - 30.0)
    cand_lp = full_logprobs[cand]
    order = np.argsort(-cand_lp, kind="stable")
    cand, cand_lp = cand[order], cand_lp[order]
    probs = np.exp(cand_lp - cand_lp[0])  # relative to the top token
    keep = probs.shape[0]
    if config.top_p < 1.0:
        cum = np.cumsum(probs) / probs.sum()
        keep = min(keep, int(np.searchsorted(cum, config.top_p, side="left")) + 1)
    if config.min_p > 0.0:
        # probs is sorted descending and probs[0] == 1: keep those >= min_p of the top token.
        keep = min(keep, int(np.searchsorted(-probs, -config.min_p, side="right")))
    keep = max(keep, 1)
    p = probs[:keep] / probs[:keep].sum()
    if not np.isfinite(p).all():  # degenerate logits (inf/NaN from the model): fall back to argmax
        token = int(np.argmax(logits))
        return token, float(full_logprobs[token])
    choice = int(rng.choice(keep, p=p))
    token = int(cand[choice])
    return token, float(full_logprobs[token])
