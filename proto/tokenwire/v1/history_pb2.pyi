from tokenwire.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_STATUS_UNSPECIFIED: _ClassVar[MessageStatus]
    MESSAGE_STATUS_COMPLETE: _ClassVar[MessageStatus]
    MESSAGE_STATUS_LENGTH: _ClassVar[MessageStatus]
    MESSAGE_STATUS_STOPPED: _ClassVar[MessageStatus]
    MESSAGE_STATUS_CANCELLED: _ClassVar[MessageStatus]
    MESSAGE_STATUS_ERROR: _ClassVar[MessageStatus]
    MESSAGE_STATUS_PENDING: _ClassVar[MessageStatus]
    MESSAGE_STATUS_INTERRUPTED: _ClassVar[MessageStatus]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_JSON: _ClassVar[ExportFormat]
    EXPORT_FORMAT_MARKDOWN: _ClassVar[ExportFormat]
MESSAGE_STATUS_UNSPECIFIED: MessageStatus
MESSAGE_STATUS_COMPLETE: MessageStatus
MESSAGE_STATUS_LENGTH: MessageStatus
MESSAGE_STATUS_STOPPED: MessageStatus
MESSAGE_STATUS_CANCELLED: MessageStatus
MESSAGE_STATUS_ERROR: MessageStatus
MESSAGE_STATUS_PENDING: MessageStatus
MESSAGE_STATUS_INTERRUPTED: MessageStatus
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_JSON: ExportFormat
EXPORT_FORMAT_MARKDOWN: ExportFormat

class Chat(_message.Message):
    __slots__ = ("id", "title", "model", "created_unix_ms", "updated_unix_ms", "message_count", "owner")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    model: str
    created_unix_ms: int
    updated_unix_ms: int
    message_count: int
    owner: str
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., model: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., message_count: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("id", "chat_id", "role", "content", "status", "error_message", "created_unix_ms", "model", "sampling", "max_tokens", "usage", "dropped_messages", "tool_calls", "tool_call_id", "name", "reasoning", "images")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    id: int
    chat_id: str
    role: str
    content: str
    status: MessageStatus
    error_message: str
    created_unix_ms: int
    model: str
    sampling: _inference_pb2.SamplingParams
    max_tokens: int
    usage: _inference_pb2.Usage
    dropped_messages: int
    tool_calls: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ToolCall]
    tool_call_id: str
    name: str
    reasoning: str
    images: _containers.RepeatedCompositeFieldContainer[StoredImage]
    def __init__(self, id: _Optional[int] = ..., chat_id: _Optional[str] = ..., role: _Optional[str] = ..., content: _Optional[str] = ..., status: _Optional[_Union[MessageStatus, str]] = ..., error_message: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., model: _Optional[str] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., usage: _Optional[_Union[_inference_pb2.Usage, _Mapping]] = ..., dropped_messages: _Optional[int] = ..., tool_calls: _Optional[_Iterable[_Union[_inference_pb2.ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ..., name: _Optional[str] = ..., reasoning: _Optional[str] = ..., images: _Optional[_Iterable[_Union[StoredImage, _Mapping]]] = ...) -> None: ...

class StoredImage(_message.Message):
    __slots__ = ("data", "media_type", "text")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    text: str
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class CreateChatRequest(_message.Message):
    __slots__ = ("title", "model", "system_prompt")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    title: str
    model: str
    system_prompt: str
    def __init__(self, title: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ...) -> None: ...

class ListChatsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListChatsResponse(_message.Message):
    __slots__ = ("chats", "next_page_token")
    CHATS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    chats: _containers.RepeatedCompositeFieldContainer[Chat]
    next_page_token: str
    def __init__(self, chats: _Optional[_Iterable[_Union[Chat, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetChatRequest(_message.Message):
    __slots__ = ("chat_id", "page_size", "page_token")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    page_size: int
    page_token: str
    def __init__(self, chat_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetChatResponse(_message.Message):
    __slots__ = ("chat", "messages", "next_page_token")
    CHAT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    chat: Chat
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    next_page_token: str
    def __init__(self, chat: _Optional[_Union[Chat, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RenameChatRequest(_message.Message):
    __slots__ = ("chat_id", "title")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    title: str
    def __init__(self, chat_id: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class DeleteChatRequest(_message.Message):
    __slots__ = ("chat_id",)
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    def __init__(self, chat_id: _Optional[str] = ...) -> None: ...

class DeleteChatResponse(_message.Message):
    __slots__ = ("deleted_messages",)
    DELETED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    deleted_messages: int
    def __init__(self, deleted_messages: _Optional[int] = ...) -> None: ...

class AppendMessageRequest(_message.Message):
    __slots__ = ("chat_id", "role", "content")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    role: str
    content: str
    def __init__(self, chat_id: _Optional[str] = ..., role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SearchChatsRequest(_message.Message):
    __slots__ = ("query", "limit")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    query: str
    limit: int
    def __init__(self, query: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class TextSpan(_message.Message):
    __slots__ = ("text", "highlighted")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HIGHLIGHTED_FIELD_NUMBER: _ClassVar[int]
    text: str
    highlighted: bool
    def __init__(self, text: _Optional[str] = ..., highlighted: _Optional[bool] = ...) -> None: ...

class SearchSnippet(_message.Message):
    __slots__ = ("message_id", "role", "spans")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    role: str
    spans: _containers.RepeatedCompositeFieldContainer[TextSpan]
    def __init__(self, message_id: _Optional[int] = ..., role: _Optional[str] = ..., spans: _Optional[_Iterable[_Union[TextSpan, _Mapping]]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("chat", "snippets")
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SNIPPETS_FIELD_NUMBER: _ClassVar[int]
    chat: Chat
    snippets: _containers.RepeatedCompositeFieldContainer[SearchSnippet]
    def __init__(self, chat: _Optional[_Union[Chat, _Mapping]] = ..., snippets: _Optional[_Iterable[_Union[SearchSnippet, _Mapping]]] = ...) -> None: ...

class SearchChatsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ...) -> None: ...

class ExportChatRequest(_message.Message):
    __slots__ = ("chat_id", "format")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    format: ExportFormat
    def __init__(self, chat_id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ...) -> None: ...

class ExportChatResponse(_message.Message):
    __slots__ = ("content", "media_type", "filename")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    content: str
    media_type: str
    filename: str
    def __init__(self, content: _Optional[str] = ..., media_type: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class WatchReplyRequest(_message.Message):
    __slots__ = ("chat_id", "message_id", "after_event_id")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    message_id: int
    after_event_id: int
    def __init__(self, chat_id: _Optional[str] = ..., message_id: _Optional[int] = ..., after_event_id: _Optional[int] = ...) -> None: ...

class StopReplyRequest(_message.Message):
    __slots__ = ("chat_id", "message_id")
    CHAT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    chat_id: str
    message_id: int
    def __init__(self, chat_id: _Optional[str] = ..., message_id: _Optional[int] = ...) -> None: ...
