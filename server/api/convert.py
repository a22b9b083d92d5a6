"""Protobuf ⇄ domain, in one place: the servicers call these and translate nothing themselves.

Each outside form of the request path's records has exactly one mapping here: FinishReason and
ReplyStatus to their proto enums, Usage to pb.Usage (for the stream and the stored message
alike), store records to History messages, model state to ModelInfo.
"""

from __future__ import annotations

import json
import math
import re

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from tokenwire.server.chats.store import ChatInfo, MessageInfo, SearchResult
from tokenwire.server.engine.constraints import OutputConstraint
from tokenwire.server.engine.reasoning import ThinkSplitter
from tokenwire.server.engine.records import FinishReason, ReplyStatus, Usage
from tokenwire.server.engine.requests import GenerateParams, InvalidRequest
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.sequence import FinishedEvent, QueuedEvent, TokenEvent
from tokenwire.server.engine.tool_calls import (
    CallOut,
    TextOut,
    ToolCallRecord,
    ToolCallStream,
    ToolSpec,
    ToolUse,
)
from tokenwire.server.models.manager import ModelStatus
from tokenwire.server.models.store import ModelEntry
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import inference_pb2 as pb

FINISH_REASON = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
REPLY_STATUS = {
    ReplyStatus.COMPLETE: hpb.MESSAGE_STATUS_COMPLETE,
    ReplyStatus.LENGTH: hpb.MESSAGE_STATUS_LENGTH,
    ReplyStatus.STOPPED: hpb.MESSAGE_STATUS_STOPPED,
    ReplyStatus.CANCELLED: hpb.MESSAGE_STATUS_CANCELLED,
    ReplyStatus.ERROR: hpb.MESSAGE_STATUS_ERROR,
    ReplyStatus.PENDING: hpb.MESSAGE_STATUS_PENDING,
    ReplyStatus.INTERRUPTED: hpb.MESSAGE_STATUS_INTERRUPTED,
}
MODEL_STATE = {
    "available": pb.MODEL_STATE_AVAILABLE,
    "loading": pb.MODEL_STATE_LOADING,
    "loaded": pb.MODEL_STATE_LOADED,
    "failed": pb.MODEL_STATE_FAILED,
}
LOAD_STAGE = {
    "waiting": pb.LOAD_STAGE_WAITING,
    "unloading": pb.LOAD_STAGE_UNLOADING,
    "loading": pb.LOAD_STAGE_LOADING,
    "ready": pb.LOAD_STAGE_READY,
}


# ---- requests ------------------------------------------------------------------------------

def sampling_from_proto(msg: pb.SamplingParams) -> SamplingConfig:
    def opt(name: str, default):
        return getattr(msg, name) if msg.HasField(name) else default

    return SamplingConfig(
        temperature=float(opt("temperature", 1.0)),
        top_p=float(opt("top_p", 1.0)),
        top_k=int(opt("top_k", 0)),
        min_p=float(opt("min_p", 0.0)),
        repetition_penalty=float(opt("repetition_penalty", 1.0)),
        presence_penalty=float(opt("presence_penalty", 0.0)),
        frequency_penalty=float(opt("frequency_penalty", 0.0)),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in msg.logit_bias.items())),
    )


def params_from_proto(request: pb.GenerateRequest, user: str, cache_scope: str = "") -> GenerateParams:
    """The Generate call as the engine takes it; `user` is who it is for (fair turns), `cache_scope`
    whose prefix-cache entries it may share (the API key's user; "" without keys)."""
    return GenerateParams(
        model=request.model,
        prompt=request.prompt,
        messages=tuple(message_from_proto(m) for m in request.messages),
        sampling=sampling_from_proto(request.sampling),
        max_tokens=int(request.max_tokens),
        stop=tuple(request.stop),
        include_logprobs=request.include_logprobs,
        top_logprobs=int(request.top_logprobs),
        n=int(request.n) or 1,
        think=request.think if request.HasField("think") else None,
        ignore_eos=request.ignore_eos,
        user=user,
        cache_scope=cache_scope,
        constraint=constraint_from_proto(request.sampling),
        tools=tools_from_proto(request),
        chat_id=request.chat_id,
    )


def message_from_proto(m: pb.ChatMessage) -> dict:
    message: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "function": {"name": c.name, "arguments": c.arguments_json}}
                                 for c in m.tool_calls]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.name:
        message["name"] = m.name
    if m.images:
        message["images"] = [{"data": image.data, "media_type": image.media_type} for image in m.images]
    return message


def tools_from_proto(request: pb.GenerateRequest) -> ToolUse | None:
    """The request's tools (None when it has none and asks nothing of them)."""
    if not request.tools and not request.tool_choice:
        return None
    tools = []
    for i, t in enumerate(request.tools):
        try:
            parameters = json.loads(t.parameters_json) if t.parameters_json else {}
        except ValueError as exc:
            raise InvalidRequest(f"tools[{i}].parameters_json is not JSON: {exc}", f"tools[{i}].parameters_json") \
                from exc
        tools.append(ToolSpec(t.name, t.description, parameters))
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return ToolUse(tuple(tools), request.tool_choice or "auto", request.tool_choice_name, parallel)


def tool_call_to_proto(call: ToolCallRecord) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments)


def constraint_from_proto(sampling: pb.SamplingParams) -> OutputConstraint | None:
    """SamplingParams' `constraint` oneof as the engine's OutputConstraint (None when unset)."""
    kind = sampling.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object":
        return OutputConstraint("json_object") if sampling.json_object else None
    if kind == "choice":
        return OutputConstraint("choice", json.dumps(list(sampling.choice.options)))
    return OutputConstraint(kind, getattr(sampling, kind))


# The ids the bridge passes on (bridge/proto_request.py's rule): printable, no spaces or newlines.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def check_request_id(request_id: str) -> None:
    """InvalidRequest unless the caller's request id is empty (the server picks one) or a plain token.
    The id is written into the server's log line for the request: a newline in it would let a
    client forge log lines (found by tests/api/test_fuzz_grpc.py)."""
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest("request_id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
                             "request_id")


def keep_alive_of(request: pb.GenerateRequest | pb.LoadModelRequest) -> float | None:
    """The request's `keep_alive_s`, None when unset; InvalidRequest when not a number."""
    if not request.HasField("keep_alive_s"):
        return None
    value = float(request.keep_alive_s)
    if math.isnan(value):
        raise InvalidRequest("keep_alive_s must be a number of seconds (0: unload at once, negative: forever)",
                             "keep_alive_s")
    return value


def stored_params(request: pb.GenerateRequest) -> dict:
    """The generation parameters stored with a chat reply."""
    params: dict = {"sampling": MessageToDict(request.sampling, preserving_proto_field_name=True)}
    if request.max_tokens:
        params["max_tokens"] = request.max_tokens
    if request.stop:
        params["stop"] = list(request.stop)
    return params


# ---- the stream ----------------------------------------------------------------------------

def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(**{name: getattr(usage, name) for name in Usage.field_names()})


def started_to_proto(model_id: str, request_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(started=pb.Started(model=model_id, request_id=request_id))


def event_to_proto(event: TokenEvent | QueuedEvent | FinishedEvent, model_id: str) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        return pb.GenerateResponse(token=token_delta(event, event.text))
    if isinstance(event, QueuedEvent):
        return pb.GenerateResponse(queued=pb.QueueStatus(position=event.position))
    return pb.GenerateResponse(finished=pb.Finished(
        reason=FINISH_REASON[event.reason], usage=usage_to_proto(event.usage), error_message=event.error_message,
        model=model_id, matched_stop=event.matched_stop,
    ))


def with_choice(response: pb.GenerateResponse, choice: int) -> pb.GenerateResponse:
    """The event marked as choice `choice` of the request's n (0 needs no mark)."""
    kind = response.WhichOneof("event")
    if choice and kind in ("token", "finished", "tool_call"):
        getattr(response, kind).choice = choice
    return response


def token_delta(event: TokenEvent, text: str) -> pb.TokenDelta:
    delta = pb.TokenDelta(text=text, token_id=event.token_id, index=event.index)
    if event.logprob is not None:
        delta.logprob = event.logprob
    for token_id, token_text, logprob in event.top_logprobs or ():
        delta.top_logprobs.add(token_id=token_id, text=token_text, logprob=logprob)
    return delta


def shaped_event_to_proto(event: TokenEvent | QueuedEvent | FinishedEvent, model_id: str,
                          calls: ToolCallStream | None, thinking: ThinkSplitter | None) -> list[pb.GenerateResponse]:
    """event_to_proto for a reply that may think or call tools. Its text goes through `thinking`,
    which sends a reasoning model's <think> block as TokenDelta.reasoning, then through `calls`,
    which keeps the calls out of the text: each call is sent as a tool_call event (id and name, then
    the arguments) and, whole, in Finished, whose reason is then TOOL_CALLS."""
    if isinstance(event, QueuedEvent):
        return [event_to_proto(event, model_id)]
    token = isinstance(event, TokenEvent)
    reasoning, text = "", event.text if token else ""
    if thinking is not None:
        reasoning, text = thinking.feed(text) if token else thinking.finish()
    parts: list = [TextOut(text)] if calls is None else (calls.feed(text) + ([] if token else calls.finish()))
    text = "".join(p.text for p in parts if not isinstance(p, CallOut))
    out: list[pb.GenerateResponse] = []
    if token:
        delta = token_delta(event, text)
        delta.reasoning = reasoning
        out.append(pb.GenerateResponse(token=delta))
    elif text or reasoning:  # held back while it might have opened a call or a tag
        out.append(pb.GenerateResponse(token=pb.TokenDelta(text=text, reasoning=reasoning,
                                                           index=event.usage.completion_tokens)))
    for part in parts:
        if isinstance(part, CallOut):
            out.append(pb.GenerateResponse(tool_call=pb.ToolCallDelta(index=part.index, id=part.call.id,
                                                                      name=part.call.name)))
            out.append(pb.GenerateResponse(tool_call=pb.ToolCallDelta(index=part.index,
                                                                      arguments=part.call.arguments)))
    if isinstance(event, FinishedEvent):
        finished = event_to_proto(event, model_id)
        if calls is not None and calls.calls and event.reason == FinishReason.STOP:
            finished.finished.reason = pb.FINISH_REASON_TOOL_CALLS
            finished.finished.matched_stop = ""
        if calls is not None:
            finished.finished.tool_calls.extend(tool_call_to_proto(c) for c in calls.calls)
        out.append(finished)
    return out


def chat_turn_to_proto(chat_id: str, user_message_id: int, reply_message_id: int,
                       dropped_messages: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(chat=pb.ChatTurn(chat_id=chat_id, user_message_id=user_message_id,
                                                reply_message_id=reply_message_id,
                                                dropped_messages=dropped_messages))


# ---- chats ---------------------------------------------------------------------------------

def chat_to_proto(chat: ChatInfo) -> hpb.Chat:
    return hpb.Chat(id=chat.id, title=chat.title, model=chat.model, created_unix_ms=chat.created_ms,
                    updated_unix_ms=chat.updated_ms, message_count=chat.message_count, owner=chat.owner)


def _reply_status(status: str) -> int:
    try:
        return REPLY_STATUS[ReplyStatus(status)]
    except ValueError:  # a status this server does not know (a newer one wrote it)
        return hpb.MESSAGE_STATUS_UNSPECIFIED


def message_to_proto(m: MessageInfo) -> hpb.Message:
    out = hpb.Message(
        id=m.id, chat_id=m.chat_id, role=m.role, content=m.content,
        status=_reply_status(m.status),
        error_message=m.error_message, created_unix_ms=m.created_ms, model=m.model,
        max_tokens=int(m.params.get("max_tokens", 0) or 0), dropped_messages=m.dropped_messages,
    )
    if m.params.get("sampling"):
        try:
            ParseDict(m.params["sampling"], out.sampling, ignore_unknown_fields=True)
        except ParseError:
            pass
    if m.role == "assistant":
        out.usage.CopyFrom(usage_to_proto(m.usage))
    out.tool_calls.extend(pb.ToolCall(id=c.get("id", ""), name=c.get("name", ""), arguments_json=c.get("arguments", ""))
                          for c in m.tool_calls)
    out.tool_call_id, out.name, out.reasoning = m.tool_call_id, m.name, m.reasoning
    out.images.extend(hpb.StoredImage(data=i["data"], media_type=i.get("media_type", ""), text=i.get("text", ""))
                      for i in m.images)
    return out


def result_to_proto(result: SearchResult) -> hpb.SearchResult:
    return hpb.SearchResult(
        chat=chat_to_proto(result.chat),
        snippets=[hpb.SearchSnippet(message_id=s.message_id, role=s.role,
                                    spans=[hpb.TextSpan(text=t, highlighted=h) for t, h in s.spans])
                  for s in result.snippets],
    )


# ---- models --------------------------------------------------------------------------------

def _ms(unix_s: float | None) -> int:
    return int(unix_s * 1000) if unix_s else 0


def model_info_to_proto(entry: ModelEntry, status: ModelStatus, size_bytes: int, aliases: list[str],
                        is_default: bool) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=entry.id,
        architecture=entry.architecture,
        parameter_count=entry.parameter_count,
        precision=entry.precision,
        context_length=entry.context_length,
        loaded=status.state == "loaded",
        state=MODEL_STATE[status.state],
        size_bytes=size_bytes,
        error_message=status.error,
        aliases=aliases,
        is_default=is_default,
        memory_bytes=status.memory_bytes,
        kv_cache_bytes=status.kv_cache_bytes,
        last_used_unix_ms=_ms(status.last_used),
        load_time_ms=status.load_seconds * 1000,
        load_count=status.load_count,
        expires_unix_ms=_ms(status.expires_at),
        active_requests=status.active_requests,
        kind=entry.kind,
    )
