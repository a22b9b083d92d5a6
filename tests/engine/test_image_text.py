"""OCR of drawn text (the voice-and-image issue: "text drawn with Pillow (several sizes, a rotated and
a blurred copy) read back exactly"), the checks on what is an image, and the prompt block."""

from __future__ import annotations

import pytest
from images_drawn import text_image

from tokenwire.server.engine.image_text import (
    MAX_IMAGE_BYTES,
    ImageError,
    ImageReader,
    check_image,
    with_images,
)

pytestmark = pytest.mark.slow  # OCR models on onnxruntime: seconds

LINES = ["Meeting moved to Thursday 14:30", "Room B204, second floor"]


@pytest.fixture(scope="module")
def reader() -> ImageReader:
    return ImageReader(threads=2)


@pytest.mark.parametrize("variant", [
    {"size": 18}, {"size": 28}, {"size": 48}, {"size": 28, "angle": 7}, {"size": 28, "blur": 1.2},
    {"size": 28, "fmt": "JPEG"}, {"size": 28, "fmt": "WEBP"},
])
def test_drawn_text_is_read_back_exactly(reader, variant) -> None:
    found = reader.read(text_image(LINES, **variant))
    assert found.text.split("\n") == LINES, (variant, found.text)


def test_what_is_not_an_image_is_refused_by_name() -> None:
    with pytest.raises(ImageError) as exc:
        check_image(b"GIF89a" + b"\0" * 20, "messages[0].images[1]")
    assert str(exc.value).startswith("messages[0].images[1] is not an image that can be read")
    with pytest.raises(ImageError) as exc:
        check_image(b"x" * (MAX_IMAGE_BYTES + 1), "img")
    assert exc.value.too_large and str(exc.value) == "img is 3.0 MiB; images are at most 3 MiB"
    tiff = text_image(["x"], fmt="TIFF")
    with pytest.raises(ImageError, match="is TIFF; send PNG, JPEG, WebP, GIF or BMP"):
        check_image(tiff, "img")


def test_the_prompt_block_is_delimited_and_says_what_it_is() -> None:
    content = with_images("What does it say?", ["Hello", ""])
    assert content == ("What does it say?\n\n[Image 1: the text found in it by OCR; nothing else of the image is "
                       "known]\nHello\n[End of image 1]\n\n[Image 2: the text found in it by OCR; nothing else of "
                       "the image is known]\n(no text found in the image)\n[End of image 2]")
    assert with_images("plain", []) == "plain"
