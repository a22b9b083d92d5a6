"""A request's images read for their text (OCR) before the request is built: the service's side of
engine/image_text.py. The reading runs off the event loop, on the reader's own thread, one
image at a time; past MAX_WAITING images waiting, a request is refused as busy (retry)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tokenwire.server.engine.image_text import MAX_WAITING, ImageError, ImageReader
from tokenwire.server.engine.requests import GenerateParams, InvalidRequest
from tokenwire.server.engine.scheduler import QueueFull


async def read_images(params: GenerateParams, reader: ImageReader) -> GenerateParams:
    """`params` with each image's text beside it (messages[i].images[j].text); InvalidRequest
    (reason IMAGE_TOO_LARGE or IMAGE_INVALID) for an image that cannot be read."""
    if not any(m.get("images") for m in params.messages):
        return params
    loop = asyncio.get_running_loop()
    messages = []
    for i, message in enumerate(params.messages):
        images = []
        for j, image in enumerate(message.get("images") or ()):
            where = f"messages[{i}].images[{j}]"
            if reader.waiting >= MAX_WAITING:
                raise QueueFull(message=f"the server is busy reading {reader.waiting} other images; retry shortly")
            reader.waiting += 1
            try:
                found = await loop.run_in_executor(reader.pool, reader.read, image["data"], where)
            except ImageError as exc:
                raise InvalidRequest(str(exc), where, "IMAGE_TOO_LARGE" if exc.too_large else "IMAGE_INVALID") \
                    from exc
            finally:
                reader.waiting -= 1
            images.append({"data": image["data"], "media_type": found.media_type, "text": found.text})
        messages.append({**message, "images": images} if images else message)
    return replace(params, messages=tuple(messages))
