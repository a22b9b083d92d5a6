"""Images in a chat, read for their text: the server's only image understanding.

An image sent with a message is checked (a format Pillow reads: PNG, JPEG, WebP, GIF or BMP; at
most MAX_IMAGE_BYTES and MAX_PIXELS), read with OCR (RapidOCR on onnxruntime with PaddleOCR's
PP-OCR models: the store's `ocr` model when there is one, else the models inside the rapidocr
wheel), and given to the model as a delimited block of plain text in the message's content, one
line per line of text, top to bottom. The block is part of the message's content, so the tokenizer
reads it as plain text: text in an image never becomes a control token (TokenizerBundle.encode_chat).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_IMAGE_BYTES = 3 << 20  # with the rest of a request, within gRPC's 4 MiB message
MAX_PIXELS = 40_000_000  # 40 megapixels; Pillow's own bomb check is at ~89
MAX_IMAGES_PER_REQUEST = 8
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
_CACHE_ENTRIES = 64  # texts of recent images by digest: a stored chat's turns do not read them again


class ImageError(ValueError):
    """An image that cannot be read (its reason names the field)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class ImageText:
    media_type: str
    text: str  # the lines found, joined by newlines ("" when none)


def check_image(data: bytes, where: str) -> tuple[str, tuple[int, int]]:
    """(media type, size) of an image we accept; ImageError otherwise."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{where} is {len(data) / 2**20:.1f} MiB; images are at most {MAX_IMAGE_BYTES >> 20} MiB",
                         too_large=True)
    if not data:
        raise ImageError(f"{where} is empty")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, size = image.format, image.size
            if kind not in FORMATS:
                raise ImageError(f"{where} is {kind or 'an unknown format'}; send PNG, JPEG, WebP, GIF or BMP")
            if size[0] * size[1] > MAX_PIXELS:
                raise ImageError(f"{where} is {size[0]}x{size[1]} pixels; at most {MAX_PIXELS // 1_000_000} "
                                 "megapixels", too_large=True)
            image.verify()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where} is not an image that can be read (PNG, JPEG, WebP, GIF or BMP): {exc}") from exc
    return FORMATS[kind], size


def prompt_block(texts: list[str], first_index: int = 1) -> str:
    """The images' texts as the model reads them, appended to its message."""
    blocks = []
    for i, text in enumerate(texts, start=first_index):
        body = text if text.strip() else "(no text found in the image)"
        blocks.append(f"[Image {i}: the text found in it by OCR; nothing else of the image is known]\n{body}\n"
                      f"[End of image {i}]")
    return "\n\n".join(blocks)


def with_images(content: str, texts: list[str]) -> str:
    """A message's content for the prompt: its text, then its images' blocks."""
    if not texts:
        return content
    block = prompt_block(texts)
    return f"{content}\n\n{block}" if content else block


def _lines(result: Any) -> list[str]:
    """RapidOCR's boxes grouped into lines: boxes whose vertical centres are close are one line,
    read left to right; lines top to bottom."""
    if result is None or result.boxes is None or not result.txts:
        return []
    items = []
    for box, text in zip(result.boxes.tolist(), result.txts, strict=False):
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        items.append(((min(ys) + max(ys)) / 2, max(ys) - min(ys), min(xs), text))
    items.sort()
    lines: list[list[tuple[float, str]]] = []
    centre = height = None
    for y, h, x, text in items:
        if centre is not None and abs(y - centre) <= max(height, h) * 0.5:
            lines[-1].append((x, text))
        else:
            lines.append([(x, text)])
            centre, height = y, h
    return [" ".join(t for _, t in sorted(line)) for line in lines]


MAX_WAITING = 16  # images waiting for the reader; more is "busy" (retry), not an unbounded queue


class ImageReader:
    """OCR of images, one at a time on a thread of its own (so that a burst of images never holds
    the threads the rest of the server runs on), with the texts of recent images kept by digest."""

    def __init__(self, model_folder: Path | None = None, threads: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.model_folder = model_folder
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocr")
        self.waiting = 0  # images submitted and not yet read (counted on the event loop's thread)
        self._engine = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str] = OrderedDict()

    # ---- what the model manager sees (an `ocr` model in the store is loaded as one of these) -----

    def load(self) -> ImageReader:
        """Opens the OCR models now (at load time, so the load's time and memory are the model's)."""
        with self._lock:
            self._ocr()
        return self

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self._lock.locked()

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._engine = None

    def _ocr(self):
        if self._engine is None:
            import logging

            from rapidocr import RapidOCR

            params: dict[str, Any] = {"Global.log_level": "warning"}
            if self.threads:
                params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.threads
            folder = self.model_folder
            if folder is not None:
                for part, pattern in (("Det", "*det*.onnx"), ("Rec", "*rec*.onnx"), ("Cls", "*cls*.onnx")):
                    found = sorted(folder.glob(pattern))
                    if found:
                        params[f"{part}.model_path"] = str(found[0])
            self._engine = RapidOCR(params=params)
            logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        return self._engine

    def read(self, data: bytes, where: str = "image") -> ImageText:
        media_type, _ = check_image(data, where)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return ImageText(media_type, self._cache[digest])
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
            import numpy as np

            text = "\n".join(_lines(self._ocr()(np.asarray(rgb)[:, :, ::-1])))
            self._cache[digest] = text
            if len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return ImageText(media_type, text)
