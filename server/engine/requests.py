"""Turns what a client asked for into a validated GenerationRequest, or says what is wrong.

`GenerateParams` is the transport-neutral form of a Generate call, built once by the edge (the
gRPC service) with everything it knows, the caller included; nothing patches it afterwards.
`check_shape` runs the checks that need no model, `build_request` the ones that do (the chat
template, the context window). Every refusal is an InvalidRequest naming the field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .constraints import ConstraintError, OutputConstraint, RowConstraint
from .image_text import MAX_IMAGES_PER_REQUEST, with_images
from .reasoning import opens_thinking, template_can_stop_thinking, template_thinks
from .records import ROLES
from .sampling import MAX_TOP_LOGPROBS, SamplingConfig, SamplingError
from .sequence import GenerationRequest
from .tokenizer import ChatTemplateError, TokenizerBundle
from .tool_calls import (
    ToolError,
    ToolUse,
    args_key,
    call_grammar,
    generic_messages,
    template_messages,
    template_takes_tools,
)

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_CHOICES = 8


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
    # {"role", "content"}; an assistant message may add "tool_calls" ([{"id", "function": {"name",
    # "arguments"}}]), a tool message "tool_call_id" and "name".
    messages: tuple[dict[str, Any], ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    include_logprobs: bool = False
    top_logprobs: int = 0  # with include_logprobs: alternatives per position, at most MAX_TOP_LOGPROBS
    ignore_eos: bool = False
    user: str = ""  # who is asking, for fair turns ("" is one shared anonymous user)
    cache_scope: str = ""  # whose prefix-cache entries it may reuse (the key's user; "" without keys)
    constraint: OutputConstraint | None = None  # structured output: what the text must match
    tools: ToolUse | None = None  # functions the model may call
    n: int = 1  # independent replies (choices) to the one prompt
    think: bool | None = None  # a reasoning model's thinking: None the template's default
    chat_id: str = ""  # the stored chat it is a turn of ("" none): context_fit keys its KV on disk by it


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
        if message.get("tool_calls") and message["role"] != "assistant":
            raise InvalidRequest(f"messages[{i}]: only assistant messages hold tool_calls", f"messages[{i}].tool_calls")
    for i, message in enumerate(params.messages):
        if message.get("images") and message["role"] != "user":
            raise InvalidRequest(f"messages[{i}]: only user messages hold images", f"messages[{i}].images")
    if sum(len(m.get("images") or ()) for m in params.messages) > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequest(f"at most {MAX_IMAGES_PER_REQUEST} images in a request", "messages")
    if params.messages and not any(m.get("content") or m.get("tool_calls") or m.get("images")
                                   for m in params.messages):
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
    if not 1 <= params.n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be 1 to {MAX_CHOICES}, got {params.n}", "n")
    if chat and params.n > 1:
        raise InvalidRequest("n > 1 has no place on a stored chat (chat_id): a chat keeps one reply per turn", "n")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, got {params.top_logprobs}", "top_logprobs")
    if params.constraint is not None:
        try:
            params.constraint.grammar()  # a malformed schema or regex is refused before any model loads
        except ConstraintError as exc:
            raise InvalidRequest(str(exc), f"sampling.{params.constraint.kind}", "CONSTRAINT_INVALID") from exc
    if params.tools is not None:
        try:
            params.tools.check()
        except ToolError as exc:
            raise InvalidRequest(str(exc), exc.field) from exc
        if params.tools.calls_allowed and params.constraint is not None and (
                params.tools.choice != "auto" or params.constraint.kind not in ("json_schema", "json_object")):
            raise InvalidRequest("a constraint (response_format) goes with tools only as a JSON schema or JSON "
                                 "object, with tool_choice auto", f"sampling.{params.constraint.kind}")
        try:  # the tools' schemas compile (an unsupported keyword is refused before any model loads)
            tool_constraint(params.tools, "arguments", None)
        except ConstraintError as exc:
            raise InvalidRequest(f"tools: {exc}", "tools", "CONSTRAINT_INVALID") from exc


def tool_constraint(use: ToolUse, key: str, constraint: OutputConstraint | None) -> str | None:
    """The llguidance grammar of a reply that may call tools (None when no call may be made)."""
    if not use.calls_allowed:
        return None
    schema: dict[str, Any] | None = None
    if constraint is not None:
        schema = json.loads(constraint.text) if constraint.kind == "json_schema" else {"type": "object"}
    return OutputConstraint("lark", call_grammar(use, key, schema)).grammar()


def thinking_of(params: GenerateParams, tokenizer: TokenizerBundle) -> tuple[str, bool | None]:
    """("outside" when the reply's thinking is split off, else ""; the template's enable_thinking)."""
    source = tokenizer.chat_template_source
    if not template_thinks(source):
        if params.think:
            raise InvalidRequest("think: this model does not think (its chat template marks no <think>)", "think")
        return "", None
    if params.think is False:
        if not template_can_stop_thinking(source):
            raise InvalidRequest("think: this model's chat template has no switch to turn its thinking off",
                                 "think")
        return "outside", False
    return "outside", None


def with_image_texts(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their images' texts (read by the server) in their content, as the model
    is given them."""
    return [{**m, "content": with_images(m.get("content") or "", [i.get("text", "") for i in m["images"]])}
            if m.get("images") else m for m in messages]


def chat_input(params: GenerateParams, tokenizer: TokenizerBundle) -> tuple[list[dict[str, Any]], list | None]:
    """The messages (and tools) the template renders: as they are for an ordinary chat; for one
    with tools, calls or results, in the template's own tool shape when it takes tools, else
    through the generic tool prompt."""
    messages = with_image_texts(params.messages)
    tools = params.tools.tools if params.tools is not None else ()
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, None
    if tokenizer.has_chat_template and template_takes_tools(tokenizer.chat_template_source):
        shown = [t.openai() for t in tools]
        if tokenizer.holds_control_text(json.dumps(shown, ensure_ascii=False)):
            raise InvalidRequest("tools hold the text of one of the model's control tokens", "tools")
        return template_messages(messages), shown or None
    return generic_messages(messages, tools), None


def build_request(
    params: GenerateParams, model: ServedModel, default_max_tokens: int, received_at: float
) -> GenerationRequest:
    """Renders and tokenizes the prompt and fits the request into the model's context window."""
    thinking, switch = thinking_of(params, model.tokenizer)
    if params.messages:
        messages, tools = chat_input(params, model.tokenizer)
        try:
            ids = model.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools, enable_thinking=switch)
            if thinking:
                text = model.tokenizer.render_chat(messages, True, tools, switch)
                thinking = "inside" if opens_thinking(text) else "outside"
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
    try:
        params.sampling.check_vocabulary(model.tokenizer.tokenizer.get_vocab_size())
    except SamplingError as exc:
        raise InvalidRequest(str(exc), "logit_bias") from exc
    kind, grammar, constraint = "", None, None
    try:
        if params.tools is not None and params.tools.calls_allowed:
            source = model.tokenizer.chat_template_source
            key = args_key(source) if template_takes_tools(source) else "arguments"
            kind, grammar = "tools", tool_constraint(params.tools, key, params.constraint)
        elif params.constraint is not None:
            kind, grammar = params.constraint.kind, params.constraint.grammar()
        if grammar is not None:
            constraint = RowConstraint(grammar, model.tokenizer.grammar)
    except ConstraintError as exc:
        message = str(exc) if str(exc).startswith(kind) else f"{kind}: {exc}"
        raise InvalidRequest(message, "tools" if kind == "tools" else f"sampling.{kind}", "CONSTRAINT_INVALID") from exc
    return GenerationRequest(
        prompt_ids=ids,
        max_tokens=max_tokens,
        sampling=params.sampling,
        stop=list(params.stop),
        include_logprobs=params.include_logprobs,
        top_logprobs=params.top_logprobs,
        ignore_eos=params.ignore_eos,
        user=params.user,
        cache_scope=params.cache_scope,
        received_at=received_at,
        constraint=constraint,
        thinking=thinking if params.messages else "",
    )


def choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The request as `n` independent choices: each with its own grammar matcher and, when a seed
    is set, seed + i (so choices differ and a rerun repeats them); they share the prompt's prefill."""
    if n <= 1:
        return [request]
    out = []
    for i in range(n):
        seed = request.sampling.seed
        sampling = replace(request.sampling, seed=(seed + i) % (1 << 64)) if seed is not None else request.sampling
        constraint = request.constraint if i == 0 or request.constraint is None else request.constraint.copy()
        out.append(replace(request, sampling=sampling, constraint=constraint, share_prefill=True))
    return out
