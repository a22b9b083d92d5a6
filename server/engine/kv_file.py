"""One KV file of the disk tier (kv_disk.py): a finished turn's cache, checked when read back.

    b"TWKV" | u16 format | u16 0 | u32 H | header (H bytes of JSON) | sha256 (32 bytes) | zeros to 64 | arrays

The header names the model (id and graph fingerprint), the owner's scope, the chat, the token
ids the KV is of, and the arrays' dtype and shapes; the arrays follow back to back, C order.
The digest covers the header and the arrays, so a flipped byte anywhere (a token id included: a
KV matched to the wrong tokens would decode nonsense) or a short file reads as `CorruptKVFile`.
The format number stands before the header so that a file of another layout is recognised as
such (`StaleKVFile`) without parsing it.

A file is written to a temporary name in its folder (mode 0600) and renamed into place, so a
reader sees a whole file or none; it is not fsynced: after a power cut a torn file fails its
digest and is ignored, which costs one recompute, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batch_engine import KVCache

MAGIC = b"TWKV"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<4sHHI")  # magic, format, reserved, header length
_DIGEST_BYTES = 32
_ALIGN = 64
MAX_HEADER_BYTES = 16 << 20  # a header is the token ids and a few names: far less than this
TEMP_MARK = ".tmp-"  # in the name of a file being written (left over only by a crash)


class CorruptKVFile(ValueError):
    """The file is damaged (short, unparsable, or its digest does not match)."""


class StaleKVFile(ValueError):
    """The file is sound but of another format version, model build, owner or chat."""


@dataclass(frozen=True)
class KVHeader:
    model: str
    fingerprint: str  # the graph build the KV was computed by (kv_disk.graph_fingerprint)
    scope: str  # the owner (prefix_cache.py's scope): never read back for anyone else
    chat: str
    tokens: tuple[int, ...]  # what the KV is of: tokens[i] is position i
    dtype: str  # numpy's dtype.str, e.g. "<f4", "<f2"
    shapes: tuple[tuple[int, ...], ...]  # one per array, in the engine's layout

    def to_json(self) -> bytes:
        return json.dumps({"model": self.model, "fingerprint": self.fingerprint, "scope": self.scope,
                           "chat": self.chat, "tokens": list(self.tokens), "dtype": self.dtype,
                           "shapes": [list(s) for s in self.shapes]}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> KVHeader:
        try:
            d = json.loads(raw)
            header = cls(str(d["model"]), str(d["fingerprint"]), str(d["scope"]), str(d["chat"]),
                         tuple(int(t) for t in d["tokens"]), str(d["dtype"]),
                         tuple(tuple(int(n) for n in s) for s in d["shapes"]))
            np.dtype(header.dtype)
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptKVFile(f"unreadable header: {exc}") from None
        return header

    @property
    def payload_bytes(self) -> int:
        size = np.dtype(self.dtype).itemsize
        return sum(int(np.prod(s)) * size for s in self.shapes)


def _data_offset(header_bytes: int) -> int:
    end = _PREAMBLE.size + header_bytes + _DIGEST_BYTES
    return -(-end // _ALIGN) * _ALIGN


def write_kv_file(path: Path, header: KVHeader, kv: KVCache,
                  commit: Callable[[Path, Path], None] = os.replace) -> int:
    """Writes the file atomically: to a temporary name beside `path` (mode 0600), then
    `commit(temporary, path)` (a rename; the disk tier's also checks, under its lock, that the
    chat was not deleted meanwhile). Returns the file's size."""
    arrays = [np.ascontiguousarray(a) for a in kv]
    raw = header.to_json()
    digest = hashlib.sha256(raw)
    for a in arrays:
        digest.update(memoryview(a).cast("B"))  # hashlib releases the GIL on large buffers
    offset = _data_offset(len(raw))
    temp = path.with_name(f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(raw)))
            f.write(raw)
            f.write(digest.digest())
            f.write(b"\0" * (offset - f.tell()))
            for a in arrays:
                f.write(memoryview(a).cast("B"))
            size = f.tell()
        commit(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    temp.unlink(missing_ok=True)  # a commit that declined leaves it
    return size


@dataclass
class OpenedKVFile:
    """A file whose header was read (and not yet trusted: `read_arrays` checks the digest)."""

    path: Path
    header: KVHeader
    raw_header: bytes
    digest: bytes
    offset: int
    size: int


def read_header(path: Path) -> OpenedKVFile:
    """The file's header. Raises OSError (gone), StaleKVFile (another format) or CorruptKVFile."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        preamble = f.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size:
            raise CorruptKVFile("shorter than its preamble")
        magic, version, _, length = _PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise CorruptKVFile("not a KV file (bad magic)")
        if version != FORMAT_VERSION:
            raise StaleKVFile(f"format {version}, this server reads {FORMAT_VERSION}")
        if length > MAX_HEADER_BYTES:
            raise CorruptKVFile(f"header of {length} bytes")
        raw = f.read(length)
        digest = f.read(_DIGEST_BYTES)
    if len(raw) < length or len(digest) < _DIGEST_BYTES:
        raise CorruptKVFile("truncated header")
    header = KVHeader.from_json(raw)
    offset = _data_offset(length)
    if size != offset + header.payload_bytes:
        raise CorruptKVFile(f"{size} bytes where the header needs {offset + header.payload_bytes}")
    return OpenedKVFile(path, header, raw, digest, offset, size)


def read_arrays(opened: OpenedKVFile) -> KVCache:
    """The arrays, read in one call into one buffer and checked against the digest (CorruptKVFile
    when they do not match); views into that buffer, in the header's shapes."""
    header = opened.header
    buffer = np.empty(header.payload_bytes, dtype=np.uint8)
    with open(opened.path, "rb") as f:
        f.seek(opened.offset)
        got = f.readinto(memoryview(buffer))
    if got != buffer.nbytes:
        raise CorruptKVFile(f"payload cut short ({got} of {buffer.nbytes} bytes)")
    digest = hashlib.sha256(opened.raw_header)
    digest.update(memoryview(buffer))
    if digest.digest() != opened.digest:
        raise CorruptKVFile("digest mismatch")
    dtype = np.dtype(header.dtype)
    arrays, at = [], 0
    for shape in header.shapes:
        n = int(np.prod(shape)) * dtype.itemsize
        arrays.append(buffer[at: at + n].view(dtype).reshape(shape))
        at += n
    return arrays
