"""The image reader's queue is bounded: past MAX_WAITING images waiting, a request is refused as
busy (RESOURCE_EXHAUSTED, retry) instead of queueing without end or holding the threads the rest of
the server runs on; an image the reader refuses is INVALID_ARGUMENT naming it."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.server.api.images import read_images
from tokenwire.server.engine.image_text import MAX_WAITING, ImageReader
from tokenwire.server.engine.requests import GenerateParams, InvalidRequest
from tokenwire.server.engine.scheduler import QueueFull


def params(data: bytes) -> GenerateParams:
    return GenerateParams(messages=({"role": "user", "content": "hi", "images": [{"data": data}]},))


def test_a_full_reader_says_busy_and_a_bad_image_is_named() -> None:
    reader = ImageReader()
    reader.waiting = MAX_WAITING
    with pytest.raises(QueueFull, match="busy reading 16 other images"):
        asyncio.run(read_images(params(b"x"), reader))
    reader.waiting = 0
    with pytest.raises(InvalidRequest) as exc:
        asyncio.run(read_images(params(b"not an image"), reader))
    assert (exc.value.field, exc.value.reason) == ("messages[0].images[0]", "IMAGE_INVALID")
    assert reader.waiting == 0, "a refused image leaves the count as it was"
    plain = GenerateParams(messages=({"role": "user", "content": "hi"},))
    assert asyncio.run(read_images(plain, reader)) is plain
