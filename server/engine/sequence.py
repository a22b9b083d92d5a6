"""One sequence's generation as a small state machine, and the simplest loop that drives it.

`Sequence` holds everything per request that is not the KV cache: sampling state, the text
stream with its stop strings, counts and timings. Whoever owns the model calls
`sequence.step(logits)` with the next-token logits and gets back the events to send and
the token to feed next (None when the sequence is done). The batching scheduler drives
many Sequences at once; `Generation` below drives one alone (prefill, then one token per
step) and is the reference the scheduler is tested against. None of this knows gRPC.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .batch_engine import BatchEngine
from .constraints import RowConstraint
from .records import FinishReason, Usage
from .sampling import SamplingConfig, TokenHistory, sample, top_logprobs
from .text_stream import TextStream
from .tokenizer import TokenizerBundle


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)
    include_logprobs: bool = False
    top_logprobs: int = 0  # with include_logprobs: the likeliest alternatives at each position
    ignore_eos: bool = False
    user: str = ""
    # Whose prefix-cache entries this request may reuse and makes (prefix_cache.py): the caller's
    # identity when the server has API keys, "" (everyone's) when it has none.
    cache_scope: str = ""
    received_at: float = field(default_factory=time.perf_counter)
    # Structured output: the row's grammar matcher (constraints.py); None: unconstrained.
    constraint: RowConstraint | None = None
    # One of several choices of one request: its prompt's KV goes to the prefix cache as soon as it
    # is computed, so the others prefill only what the cache cannot give them.
    share_prefill: bool = False
    # A reasoning model's reply: its <think> block is split off ("" no; "outside": the reply may
    # open one; "inside": the prompt opened it).
    thinking: str = ""
    # Opaque: the key its KV is kept under on disk (kv_disk.py), a stored chat's id; "": a stateless
    # request, whose KV is never written.
    kv_key: str = ""


@dataclass
class TokenEvent:
    text: str
    token_id: int
    index: int
    logprob: float | None = None
    # With top_logprobs: (token id, its text alone, logprob) of the likeliest tokens, likeliest first.
    top_logprobs: list[tuple[int, str, float]] | None = None


@dataclass
class FinishedEvent:
    reason: FinishReason
    usage: Usage
    error_message: str = ""
    matched_stop: str = ""
    text: str = ""


@dataclass
class QueuedEvent:
    position: int


@dataclass
class RefusedEvent:
    """A waiting request refused after all (another user needed its place in a full queue): the
    stream ends with this error instead of a FinishedEvent."""

    error: Exception


Event = TokenEvent | FinishedEvent


class Sequence:
    """Per-request generation state; feed it logits, it answers with events and the next token."""

    def __init__(self, request: GenerationRequest, tokenizer: TokenizerBundle,
                 cancelled: threading.Event | None = None) -> None:
        self.request = request
        self.cancelled = cancelled or threading.Event()
        self._rng = np.random.default_rng(request.sampling.seed)
        self._history = TokenHistory(request.prompt_ids)
        self._stream = TextStream(tokenizer.tokenizer, request.stop)
        self._tokenizer = tokenizer
        self._eos = tokenizer.eos_token_ids
        self.started_at = 0.0
        self.first_at = 0.0
        self.last_at = 0.0
        self.count = 0
        self.pieces: list[str] = []
        self.output_ids: list[int] = []
        self.cached_prompt_tokens = 0
        self.finished: FinishedEvent | None = None

    @property
    def done(self) -> bool:
        return self.finished is not None

    def start(self) -> None:
        self.started_at = time.perf_counter()

    def step(self, logits: np.ndarray) -> tuple[list[Event], int | None]:
        """Samples from `logits` [vocab]; returns (events, token to feed next or None when done)."""
        req = self.request
        if self.cancelled.is_set():
            return self.finish(FinishReason.CANCELLED), None
        constraint = req.constraint
        if constraint is not None:
            logits = constraint.mask(logits)  # only what keeps the output inside the grammar
        token, logprob = sample(logits, req.sampling, self._rng, self._history)
        if constraint is not None and not math.isfinite(logits[token]):
            # Extreme penalties can leave no finite probability (inf/inf): take the likeliest token
            # the grammar allows rather than one it forbids.
            token, logprob = int(np.argmax(logits)), math.nan
        if token in self._eos and (not req.ignore_eos or constraint is not None):
            return self.finish(FinishReason.STOP), None  # (a grammar allows the end only once complete)
        tops = None
        if req.include_logprobs and req.top_logprobs:  # before the history takes the token, as sample saw it
            tops = [(t, self._tokenizer.tokenizer.decode([t], skip_special_tokens=False), lp)
                    for t, lp in top_logprobs(logits, req.sampling, self._history, req.top_logprobs)]
        if constraint is not None:
            constraint.consume(token)
        self._history.add(token)
        self.output_ids.append(token)
        self.count += 1
        self.last_at = time.perf_counter()
        if self.count == 1:
            self.first_at = self.last_at
        text = self._stream.push(token)
        # A logprob that is not a number (-inf for a token of probability 0) is sent as none.
        lp = logprob if req.include_logprobs and math.isfinite(logprob) else None
        if self._stream.matched_stop is not None:
            events: list[Event] = [TokenEvent(text, token, self.count - 1, lp, tops)] if text else []
            self.pieces.append(text)
            return events + self.finish(FinishReason.STOP), None
        at_limit = self.count >= req.max_tokens
        complete = constraint is not None and constraint.done  # the grammar allows nothing more
        if at_limit or complete:
            text += self._stream.flush()
        self.pieces.append(text)
        events = [TokenEvent(text, token, self.count - 1, lp, tops)]
        if complete:
            return events + self.finish(FinishReason.STOP), None
        if at_limit:
            return events + self.finish(FinishReason.LENGTH), None
        return events, token

    def finish(self, reason: FinishReason, error: str = "") -> list[Event]:
        """Ends the sequence (idempotent); returns the closing events."""
        if self.finished is not None:
            return []
        events: list[Event] = []
        tail = "" if self._stream.matched_stop is not None else self._stream.flush()
        if tail:
            # Text held back for a stop string that never completed: it is output after all.
            self.pieces.append(tail)
            events.append(TokenEvent(tail, self.output_ids[-1] if self.output_ids else 0, self.count, None))
        req = self.request
        end = self.last_at or time.perf_counter()
        decode_s = self.last_at - self.first_at if self.count > 1 else 0.0
        self.finished = FinishedEvent(
            reason=reason,
            usage=Usage(
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=self.count,
                cached_prompt_tokens=self.cached_prompt_tokens,
                time_to_first_token_ms=(self.first_at - req.received_at) * 1000 if self.count else 0.0,
                decode_tokens_per_second=(self.count - 1) / decode_s if decode_s > 0 else 0.0,
                total_time_ms=(end - req.received_at) * 1000,
                queue_time_ms=((self.started_at or end) - req.received_at) * 1000,
            ),
            error_message=error,
            matched_stop=self._stream.matched_stop or "",
            text="".join(self.pieces),
        )
        return events + [self.finished]


class Generation:
    """Drives one Sequence alone: prefill, then one token per step. Iterating yields its events."""

    def __init__(
        self,
        engine: BatchEngine,
        tokenizer: TokenizerBundle,
        request: GenerationRequest,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.engine = engine
        self.sequence = Sequence(request, tokenizer, cancelled)

    def __iter__(self) -> Iterator[Event]:
        seq = self.sequence
        seq.start()
        try:
            state = self.engine.new_prefill()
            logits = self.engine.prefill(state, seq.request.prompt_ids)
            self.engine.join(state)
            while True:
                events, token = seq.step(logits)
                yield from events
                if token is None:
                    return
                logits = self.engine.step([token])[0]
        except Exception as exc:  # the stream must end with a reason, whatever failed
            yield from seq.finish(FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.engine.reset()  # the engine is this generation's alone
