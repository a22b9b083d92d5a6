"""One generation, start to finish: prefill, then one token per step, as plain events.

This is the domain loop the services drive; it knows nothing of gRPC or HTTP. It runs on a
worker thread (onnxruntime releases the GIL) and checks a cancellation flag between steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from .decoder import OnnxDecoder
from .sampling import SamplingConfig, TokenHistory, sample
from .text_stream import TextStream
from .tokenizer import TokenizerBundle


class FinishReason(Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)
    include_logprobs: bool = False
    ignore_eos: bool = False
    received_at: float = field(default_factory=time.perf_counter)


@dataclass
class TokenEvent:
    text: str
    token_id: int
    index: int
    logprob: float | None = None


@dataclass
class FinishedEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float
    decode_tokens_per_second: float
    total_time_ms: float
    queue_time_ms: float = 0.0
    error_message: str = ""
    matched_stop: str = ""
    text: str = ""


Event = TokenEvent | FinishedEvent


class Generation:
    """Iterating yields TokenEvents and ends with one FinishedEvent."""

    def __init__(
        self,
        decoder: OnnxDecoder,
        tokenizer: TokenizerBundle,
        request: GenerationRequest,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.request = request
        self.cancelled = cancelled or threading.Event()

    def __iter__(self) -> Iterator[Event]:
        req = self.request
        started = time.perf_counter()
        queue_ms = (started - req.received_at) * 1000
        rng = np.random.default_rng(req.sampling.seed)
        history = TokenHistory(req.prompt_ids)
        stream = TextStream(self.tokenizer.tokenizer, req.stop)
        eos = self.tokenizer.eos_token_ids
        first_at = last_at = 0.0
        count = 0
        token = 0
        pieces: list[str] = []
        reason = FinishReason.LENGTH
        error = ""

        def finished() -> FinishedEvent:
            end = last_at or time.perf_counter()
            decode_s = last_at - first_at if count > 1 else 0.0
            return FinishedEvent(
                reason=reason,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=count,
                time_to_first_token_ms=(first_at - req.received_at) * 1000 if count else 0.0,
                decode_tokens_per_second=(count - 1) / decode_s if decode_s > 0 else 0.0,
                total_time_ms=(end - req.received_at) * 1000,
                queue_time_ms=queue_ms,
                error_message=error,
                matched_stop=stream.matched_stop or "",
                text="".join(pieces),
            )

        try:
            if self.cancelled.is_set():
                reason = FinishReason.CANCELLED
                yield finished()
                return
            logits, cache = self.decoder.prefill(req.prompt_ids)
            while True:
                if self.cancelled.is_set():
                    reason = FinishReason.CANCELLED
                    break
                token, logprob = sample(logits, req.sampling, rng, history)
                if token in eos and not req.ignore_eos:
                    reason = FinishReason.STOP
                    break
                history.add(token)
                count += 1
                last_at = time.perf_counter()
                if count == 1:
                    first_at = last_at
                text = stream.push(token)
                if stream.matched_stop is not None:
                    reason = FinishReason.STOP
                    if text:
                        pieces.append(text)
                        yield TokenEvent(text, token, count - 1, logprob if req.include_logprobs else None)
                    break
                if count >= req.max_tokens:
                    text += stream.flush()
                pieces.append(text)
                yield TokenEvent(text, token, count - 1, logprob if req.include_logprobs else None)
                if count >= req.max_tokens:
                    reason = FinishReason.LENGTH
                    break
                logits, cache = self.decoder.decode_one_token(token, cache)
        except Exception as exc:  # the stream must end with a reason, whatever failed
            reason = FinishReason.ERROR
            error = f"{type(exc).__name__}: {exc}"
        tail = "" if stream.matched_stop is not None else stream.flush()
        if tail:
            # Text held back for a stop string that never completed: it is output after all.
            pieces.append(tail)
            end_token = next(iter(eos), 0) if reason == FinishReason.STOP else (token if count else 0)
            yield TokenEvent(tail, end_token, count, None)
        yield finished()
