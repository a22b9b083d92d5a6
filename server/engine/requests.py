"""Turns what a client asked for into a validated GenerationRequest, or says what is wrong.

`GenerateParams` is the transport-neutral form of a Generate call, built once by the edge (the
gRPC service) with everything it knows, the caller included; nothing patches it afterwards.
`check_shape` runs the checks that need no model, `build_request` the ones that do (the chat
template, the context window). Every refusal is an InvalidRequest naming the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .constraints import ConstraintError, OutputConstraint, RowConstraint
from .records import ROLES
from .sampling import SamplingConfig, SamplingError
from .sequence import GenerationRequest
from .tokenizer import ChatTemplateError, TokenizerBundle

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256


class ServedModel(Protocol):
    """What a request is built against: the loaded model's id, tokenizer and context window."""

    @property
    def id(self) -> str: ...

    @property
    def tokenizer(self) -> TokenizerBundle: ...

    @property
    def context_length(self) -> int: ...


class InvalidRequest(ValueError):
    """The request cannot be served as asked. `field` names the request field at fault ("" when
    none does); `reason` is a stable code for programs (the message is for people)."""

    def __init__(self, message: str, field: str = "", reason: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class GenerateParams:
    model: str = ""
    prompt: str = ""
    messages: tuple[dict[str, str], ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    include_logprobs: bool = False
    ignore_eos: bool = False
    user: str = ""  # who is asking, for fair turns ("" is one shared anonymous user)
    cache_scope: str = ""  # whose prefix-cache entries it may reuse (the key's user; "" without keys)
    constraint: OutputConstraint | None = None  # structured output: what the text must match


def check_shape(params: GenerateParams, max_request_bytes: int, chat: bool = False) -> None:
    """Checks that need no model: run before loading anything. With `chat` (the prompt is a
    stored chat, `messages` only its new messages) no new message is needed."""
    if params.prompt and params.messages:
        raise InvalidRequest("set either prompt or messages, not both", "prompt")
    if not chat and not params.prompt and not params.messages:
        raise InvalidRequest("empty prompt: set prompt (raw text) or messages (a chat)", "messages")
    size = len(params.prompt.encode()) + sum(len(m.get("content", "").encode()) for m in params.messages)
    if size > max_request_bytes:
        raise InvalidRequest(f"prompt is {size} bytes; the server accepts at most {max_request_bytes}",
                             "messages" if params.messages else "prompt", "PROMPT_TOO_LARGE")
    for i, message in enumerate(params.messages):
        if message.get("role") not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}",
                                 f"messages[{i}].role")
    if params.messages and not any(m.get("content") for m in params.messages):
        raise InvalidRequest("empty prompt: every message is empty", "messages")
    if params.max_tokens < 0:
        raise InvalidRequest(f"max_tokens must be >= 1, got {params.max_tokens}", "max_tokens")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(params.stop)}", "stop")
    for s in params.stop:
        if not s:
            raise InvalidRequest("stop strings must not be empty", "stop")
        if len(s.encode()) > MAX_STOP_BYTES:
            raise InvalidRequest(f"stop strings are at most {MAX_STOP_BYTES} bytes", "stop")
    try:
        params.sampling.validate()
    except SamplingError as exc:
        raise InvalidRequest(str(exc), exc.field) from exc
    if params.constraint is not None:
        try:
            params.constraint.grammar()  # a malformed schema or regex is refused before any model loads
        except ConstraintError as exc:
            raise InvalidRequest(str(exc), f"sampling.{params.constraint.kind}", "CONSTRAINT_INVALID") from exc


def build_request(
    params: GenerateParams, model: ServedModel, default_max_tokens: int, received_at: float
) -> GenerationRequest:
    """Renders and tokenizes the prompt and fits the request into the model's context window."""
    if params.messages:
        try:
            ids = model.tokenizer.encode_chat(list(params.messages), add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", "messages",
                                 "CHAT_TEMPLATE_REFUSED") from exc
    else:
        ids = model.tokenizer.encode(params.prompt)
    window = model.context_length
    prompt_field = "messages" if params.messages else "prompt"
    if not ids:
        raise InvalidRequest("empty prompt: it encodes to no tokens", prompt_field)
    if len(ids) >= window:
        raise InvalidRequest(
            f"prompt is {len(ids)} tokens; model {model.id} has a context window of {window} "
            f"(prompt + output), so at most {window - 1} prompt tokens", prompt_field, "CONTEXT_LENGTH_EXCEEDED")
    room = window - len(ids)
    if params.max_tokens > room:
        raise InvalidRequest(
            f"max_tokens {params.max_tokens} is past the context window: the prompt takes {len(ids)} of "
            f"{window} tokens, leaving {room}", "max_tokens", "CONTEXT_LENGTH_EXCEEDED")
    max_tokens = params.max_tokens or min(default_max_tokens, room)
    constraint = None
    if params.constraint is not None:
        try:
            constraint = RowConstraint(params.constraint.grammar(), model.tokenizer.grammar)
        except ConstraintError as exc:
            kind = params.constraint.kind
            message = str(exc) if str(exc).startswith(kind) else f"{kind}: {exc}"
            raise InvalidRequest(message, f"sampling.{kind}", "CONSTRAINT_INVALID") from exc
    return GenerationRequest(
        prompt_ids=ids,
        max_tokens=max_tokens,
        sampling=params.sampling,
        stop=list(params.stop),
        include_logprobs=params.include_logprobs,
        ignore_eos=params.ignore_eos,
        user=params.user,
        cache_scope=params.cache_scope,
        received_at=received_at,
        constraint=constraint,
    )
