"""A GGUF file's metadata (its key/value section) read without parsing its tensors.

gguf.GGUFReader parses every array element into a numpy view of its own, which takes 15 s for
gemma3's 262,144-token vocabulary; the tokenizer needs only the key/value section, read here in
well under a second. Standard library only: tools/record_gguf_tokens.py loads this file by path
from a virtual environment that does not have tokenwire installed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFMetadataError(ValueError):
    """The file is not a GGUF this reader understands (the message says why)."""


class _Cursor:
    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise GGUFMetadataError(f"{self.path.name}: metadata runs past the end of the file")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.at + n > len(self.data):
            raise GGUFMetadataError(f"{self.path.name}: a string runs past the end of the file")
        raw = bytes(self.data[self.at:self.at + n])
        self.at += n
        # llama.cpp keeps a token's bytes as they are; invalid UTF-8 is kept visible, not fatal.
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:  # llama.cpp refuses them too (and parsing them would recurse)
                raise GGUFMetadataError(f"{self.path.name}: an array of arrays (not a GGUF value llama.cpp reads)")
            fmt = _SCALARS.get(item)
            if fmt is None:
                raise GGUFMetadataError(f"{self.path.name}: unknown array item type {item}")
            size = struct.calcsize(fmt) * count
            if self.at + size > len(self.data):
                raise GGUFMetadataError(f"{self.path.name}: an array runs past the end of the file")
            values = list(struct.unpack_from(f"<{count}{fmt}", self.data, self.at))
            self.at += size
            return values
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFMetadataError(f"{self.path.name}: unknown value type {kind}")
        return self.take("<" + fmt)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key of the file's metadata section and its value (arrays as lists)."""
    path = Path(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != MAGIC:
            raise GGUFMetadataError(f"{path.name} is not a GGUF file (no GGUF magic)")
        cursor = _Cursor(data, path)
        cursor.at = 4
        version = cursor.take("<I")
        if version not in (2, 3):
            raise GGUFMetadataError(f"{path.name}: GGUF version {version} (a big-endian or v1 file) "
                                    "is not supported; versions 2 and 3 are")
        cursor.take("<Q")  # tensor count
        n_kv = cursor.take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.take("<I"))
        return metadata


def metadata_from_reader(reader: Any) -> dict[str, Any]:
    """The same mapping from an open gguf.GGUFReader (its fields' contents)."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def tokenizer_digest(metadata: dict[str, Any]) -> str:
    """sha256 of the file's tokenizer.* keys and values: names a vocabulary, whatever the weights."""
    tokenizer = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    text = json.dumps(tokenizer, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()
