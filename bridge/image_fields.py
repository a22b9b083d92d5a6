"""Images in requests, as OpenAI, Ollama and the chats API send them, turned into pb.Image.

OpenAI: a content part `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`;
Ollama: `images: ["<base64>", ...]` on a message; the chats API: `images: ["data:...", ...]`.
Only data URLs (or bare base64): the server fetches nothing, so a remote URL is a 400 that says
so. Sizes are checked here too, so that an oversize image is a 413 before it travels.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from tokenwire.v1 import inference_pb2 as pb

from .errors import ApiError, invalid_param
from .params import json_type

MAX_IMAGE_BYTES = 3 << 20  # as the server's (engine/image_text.py): within gRPC's 4 MiB message
MAX_REQUEST_IMAGE_BYTES = (3 << 20) + (1 << 19)  # all of a request's images together
MAX_IMAGES = 8
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.+-]+)*?;base64,(.*)", re.I | re.S)

IMAGES: dict[str, Any] = {
    "type": "array", "maxItems": MAX_IMAGES,
    "items": {"type": "string", "description": "A data: URL (data:image/png;base64,...)."},
    "description": "Images with the message (PNG, JPEG, WebP, GIF or BMP; at most 3 MiB each). The server reads "
                   "their text (OCR) and gives it to the model; it understands nothing else of an image.",
}


def too_large(param: str, size: int, limit: int) -> ApiError:
    return ApiError(413, f"{param} is {size / 2**20:.1f} MiB; images are at most {limit / 2**20:.1f} MiB "
                         "(each; 3.5 MiB in one request)", param=param, code="image_too_large")


def image_from_text(value: Any, param: str, data_url_only: bool = False) -> pb.Image:
    """A data URL (or, unless data_url_only, bare base64) as an Image."""
    if not isinstance(value, str):
        raise invalid_param(param, f"{param} must be a data: URL string, got {json_type(value)}")
    media_type, payload = "", value
    if value.startswith(("http://", "https://", "file:", "ftp:")) or "://" in value[:16]:
        raise invalid_param(param, f"{param}: remote image URLs are refused (the server fetches nothing); send the "
                                   "image itself as a data: URL (data:image/png;base64,...)")
    if value.startswith("data:"):
        match = _DATA_URL.fullmatch(value)
        if match is None:
            raise invalid_param(param, f"{param} must be a base64 data: URL of an image (data:image/png;base64,...)")
        media_type, payload = (match.group(1) or "").lower(), match.group(3)
    elif data_url_only:
        raise invalid_param(param, f"{param} must be a data: URL (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES + 4:
        raise too_large(param, len(payload) * 3 // 4, MAX_IMAGE_BYTES)
    try:
        data = base64.b64decode(payload.strip(), validate=False)
    except (binascii.Error, ValueError):
        raise invalid_param(param, f"{param}: the image's base64 does not decode") from None
    if not data:
        raise invalid_param(param, f"{param} holds no image")
    return pb.Image(data=data, media_type=media_type)


def check_total(messages: list[pb.ChatMessage], param: str = "messages") -> None:
    images = [image for m in messages for image in m.images]
    if len(images) > MAX_IMAGES:
        raise invalid_param(param, f"at most {MAX_IMAGES} images in a request, got {len(images)}")
    total = sum(len(image.data) for image in images)
    if total > MAX_REQUEST_IMAGE_BYTES:
        raise too_large(param, total, MAX_REQUEST_IMAGE_BYTES)


def image_list(value: Any, param: str, data_url_only: bool = False) -> list[pb.Image]:
    """An array of images (Ollama's `images`, the chats API's)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_param(param, f"{param} must be an array of images, got {json_type(value)}")
    if len(value) > MAX_IMAGES:
        raise invalid_param(param, f"{param}: at most {MAX_IMAGES} images, got {len(value)}")
    return [image_from_text(v, f"{param}[{i}]", data_url_only) for i, v in enumerate(value)]


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type or 'application/octet-stream'};base64,{base64.b64encode(data).decode()}"
