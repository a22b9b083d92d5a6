"""A GGUF file's metadata and tensor table, parsed quickly, its tensors memory-mapped.

gguf.GGUFReader makes a numpy view of every element of every metadata array, which takes 25 s
for a 0.5B qwen2 file and 39 s for gemma3-270m (their 150k-260k-token vocabularies, measured
here): more than the whole import may take. This reader skips the `tokenizer.*` arrays (the
tokenizer is built from the file by gguf_tokenizer.py), parses the rest with `struct`, and maps
each tensor's bytes as GGUFReader would shape them: uint8 [rows, row bytes] for block types
(and BF16), float32 / float16 [rows, K] for F32 / F16. Every read is bounds-checked: a
truncated or damaged file raises GGUFCorrupt saying where.
"""

from __future__ import annotations

import itertools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
SKIPPED_PREFIXES = ("tokenizer.",)  # arrays under these keys are skipped (their length is kept)


class GGUFCorrupt(ValueError):
    """The file is not a readable GGUF (truncated, damaged, or not GGUF at all)."""


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array not parsed (a vocabulary): its item type and length."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dim
    offset: int  # absolute, in the file
    n_bytes: int
    index: int


class GGUFFile:
    """Open with GGUFFile(path); `fields` (key -> value), `tensors`, `data(t)`; close() unmaps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise GGUFCorrupt(f"{self.path}: cannot read it: {exc}") from exc
        try:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file
            self._file.close()
            raise GGUFCorrupt(f"{self.path} is empty, not a GGUF file") from exc
        self._at = 0
        try:
            self._parse()
        except GGUFCorrupt:
            self.close()
            raise

    # ---- parsing ----
    def _fail(self, what: str) -> GGUFCorrupt:
        return GGUFCorrupt(f"{self.path} is truncated or damaged: {what} (at byte {self._at:,} of "
                           f"{len(self._map):,})")

    def _take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self._at + size > len(self._map):
            raise self._fail("it ends inside its header")
        (value,) = struct.unpack_from(fmt, self._map, self._at)
        self._at += size
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._at + n > len(self._map):
            raise self._fail("a string runs past the end of the file")
        raw = self._map[self._at:self._at + n]
        self._at += n
        return raw.decode("utf-8", errors="replace")

    def _skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self._take("<Q")
            self._at += n
            if self._at > len(self._map):
                raise self._fail("a string runs past the end of the file")

    def _value(self, kind: int, skip: bool) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._take("<I"), self._take("<Q")
            if item == _STRING:
                if skip:
                    self._skip_strings(count)
                    return SkippedArray(item, count)
                return [self._string() for _ in range(count)]
            if item == _ARRAY:  # llama.cpp refuses them too (and parsing them would recurse)
                raise self._fail("an array of arrays (not a GGUF value llama.cpp reads)")
            fmt = _SCALARS.get(item)
            if fmt is None:
                raise self._fail(f"unknown array item type {item}")
            size = struct.calcsize(fmt) * count
            if self._at + size > len(self._map):
                raise self._fail("an array runs past the end of the file")
            at, self._at = self._at, self._at + size
            if skip:
                return SkippedArray(item, count)
            return np.frombuffer(self._map, dtype=np.dtype("<" + fmt), count=count, offset=at).tolist()
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise self._fail(f"unknown value type {kind}")
        return self._take("<" + fmt)

    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if self._map[:4] != MAGIC:
            raise GGUFCorrupt(f"{self.path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        self._at = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise GGUFCorrupt(f"{self.path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        if n_tensors > len(self._map) or n_kv > len(self._map):
            raise self._fail(f"{n_tensors:,} tensors and {n_kv:,} keys cannot fit")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._take("<I"), key.startswith(SKIPPED_PREFIXES))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("<I")
            if not 1 <= n_dims <= 4:
                raise self._fail(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(self._take("<Q") for _ in range(n_dims))
            infos.append((name, shape, self._take("<I"), self._take("<Q")))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"general.alignment {alignment!r} is not a power of two")
        start = self._at + (-self._at % alignment)
        self.data_offset = start
        self.tensors: list[TensorEntry] = []
        self.by_name: dict[str, TensorEntry] = {}
        for index, (name, shape, qtype, offset) in enumerate(infos):
            try:
                kind = GGMLQuantizationType(qtype)
            except ValueError:
                raise self._fail(f"tensor {name} has an unknown type {qtype}") from None
            block, type_size = GGML_QUANT_SIZES[kind]
            elements = math.prod(shape)  # exact: dims are uint64 and their product may not fit int64
            if shape[0] % block:
                raise self._fail(f"tensor {name}'s rows ({shape[0]}) are not whole {kind.name} blocks of {block}")
            n_bytes = elements // block * type_size
            entry = TensorEntry(name, qtype, shape, start + offset, n_bytes, index)
            if entry.offset + n_bytes > len(self._map):
                raise GGUFCorrupt(f"{self.path} is truncated: tensor {name} ends at byte {entry.offset + n_bytes:,} "
                                  f"but the file has {len(self._map):,} bytes")
            if name in self.by_name:
                raise self._fail(f"tensor {name} appears twice")
            if offset % alignment:
                raise self._fail(f"tensor {name}'s data offset {offset:,} is not a multiple of the alignment {alignment}")
            self.tensors.append(entry)
            self.by_name[name] = entry
        ends = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors)
        for (_, end, first), (begin, _, second) in itertools.pairwise(ends):
            if begin < end:  # llama.cpp wants each tensor's data after the last one's, in order
                raise self._fail(f"tensors {first} and {second} overlap in the file")

    # ---- access ----
    def field(self, key: str) -> Any:
        value = self.fields.get(key)
        return None if isinstance(value, SkippedArray) else value

    def data(self, t: TensorEntry) -> np.ndarray:
        """The tensor's bytes, mapped (no copy), shaped as gguf.GGUFReader shapes them."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        rows = tuple(reversed(t.shape[1:]))
        if t.qtype == GGMLQuantizationType.F32:
            return np.frombuffer(self._map, np.float32, t.n_bytes // 4, t.offset).reshape(*rows, t.shape[0])
        if t.qtype == GGMLQuantizationType.F16:
            return np.frombuffer(self._map, np.float16, t.n_bytes // 2, t.offset).reshape(*rows, t.shape[0])
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)]
        return np.frombuffer(self._map, np.uint8, t.n_bytes, t.offset).reshape(*rows, t.shape[0] // block * type_size)

    def release(self, t: TensorEntry) -> None:
        """Gives a tensor's mapped pages back to the kernel (clean pages: read again on demand)."""
        start = t.offset - t.offset % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        """Unmaps the file; arrays from data() must be gone by then (else the map stays open)."""
        try:
            self._map.close()
        except BufferError:  # numpy views still alive: the map closes when they go
            pass
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
