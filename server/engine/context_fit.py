"""Fits a stored chat into the model's context window by leaving out its oldest turns.

The system prompt (leading system messages) and the newest user message always stay; whole
turns (a user message and what followed it) go, oldest first, until the rendered prompt
leaves room for the reply. A binary search over turn starts keeps it to a few renders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .requests import GenerateParams, ServedModel, build_request, with_image_texts
from .sequence import GenerationRequest
from .tokenizer import ChatTemplateError

Messages = list[dict[str, str]]


def reply_reserve(max_tokens: int, default_max_tokens: int, window: int) -> int:
    """Tokens kept free for the reply: what was asked for, else the default capped at a quarter
    of the window (a long chat keeps most of its history)."""
    return max_tokens or max(1, min(default_max_tokens, window // 4))


def fit_messages(messages: Messages, count_tokens: Callable[[Messages], int], budget: int) -> tuple[Messages, int]:
    """The messages to prompt with and how many were left out: the fewest oldest turns dropped
    so that count_tokens(kept) <= budget. When even the last turn alone does not fit, it is
    returned anyway (the caller reports the prompt as too long)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    system, rest = messages[:head], messages[head:]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)

    def fits(k: int) -> bool:
        return count_tokens(system + rest[starts[k]:]) <= budget

    if fits(0):
        return messages, 0
    lo, hi = 1, len(starts) - 1  # the answer is in [lo, hi]; hi (the last turn) is the fallback
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return system + rest[starts[hi]:], starts[hi]


def build_chat_request(
    params: GenerateParams, chat: Messages, model: ServedModel, default_max_tokens: int, received_at: float
) -> tuple[GenerationRequest, int]:
    """build_request for a stored chat: the prompt is `chat` (its messages, the new ones
    included), after dropping the oldest turns that do not fit; everything else is `params`, its
    chat_id the request's kv_key. Returns the request and the number of messages left out."""
    window = model.context_length
    budget = window - reply_reserve(params.max_tokens, default_max_tokens, window)
    tokenizer = model.tokenizer

    def count(messages: Messages) -> int:
        try:
            return len(tokenizer.encode_chat(with_image_texts(messages), add_generation_prompt=True))
        except ChatTemplateError:
            return 0  # build_request reports the template's complaint

    messages, dropped = fit_messages(list(chat), count, budget)
    prompt = replace(params, prompt="", messages=tuple(messages))
    # A chat's KV outlives the server (kv_disk.py), under its id; stateless requests keep none.
    request = replace(build_request(prompt, model, default_max_tokens, received_at), kv_key=params.chat_id)
    return request, dropped
