"""Images with known text, drawn with Pillow for the image tests (no files in the repo)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def text_image(lines: list[str], size: int = 28, angle: float = 0, blur: float = 0, fmt: str = "PNG") -> bytes:
    """Black text on white, one line per entry; optionally rotated and blurred."""
    try:
        font = ImageFont.truetype(FONT, size)
    except OSError:
        font = ImageFont.load_default(size=size)
    width = int(max(font.getlength(line) for line in lines)) + 2 * size
    height = int(len(lines) * size * 1.8) + 2 * size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((size, size + i * size * 1.8), line, fill="black", font=font)
    if angle:
        image = image.rotate(angle, expand=True, fillcolor="white", resample=Image.BICUBIC)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()
