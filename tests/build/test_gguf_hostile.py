"""Damaged and hostile GGUF files: each is a clear refusal (GGUFCorrupt, ImportRefused, CheckError,
ChatTemplateError), never a crash, a recursion, a huge allocation or a blocked read; and the rope
scalings real files carry (phi3's longrope factors, YaRN) decode as transformers in both the served
graph and the reference `tokenwire check` compares it with.

The files are a good fixture (tests/gguf_fixtures.py) re-written byte by byte: its metadata values,
tensor table and data as they are, one thing changed.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf_fixtures import from_transformers, gguf_fixture, random_hf_model, vocab

from tokenwire.server.build import gguf_check
from tokenwire.server.build.gguf_check import CheckError
from tokenwire.server.build.gguf_file import GGUFCorrupt, GGUFFile
from tokenwire.server.build.gguf_metadata import GGUFMetadataError, read_metadata
from tokenwire.server.build.gguf_model import MAX_CONTEXT, read_model
from tokenwire.server.build.gguf_reference import reference_logits
from tokenwire.server.build.gguf_tokenizer import write_tokenizer
from tokenwire.server.build.importer import ImportRefused, import_gguf, import_model
from tokenwire.server.engine.tokenizer import ChatTemplateError, TokenizerBundle
from tokenwire.server.models.store import ModelStore

ALIGN = 32
U32, I32, F32, STRING, ARRAY, U64 = 4, 5, 6, 8, 9, 10


# ---- a GGUF re-writer: the file's parts as bytes ----------------------------------------------

@dataclass
class Parts:
    kvs: list[tuple[str, int, bytes]]  # key, value type, the value's bytes as stored
    tensors: list[list]  # [name, shape (ggml order), type, offset]
    blob: bytes  # the data section

    def set(self, key: str, kind: int, raw: bytes) -> Parts:
        self.kvs = [kv for kv in self.kvs if kv[0] != key] + [(key, kind, raw)]
        return self

    def tensor(self, name: str) -> list:
        return next(t for t in self.tensors if t[0] == name)

    def add_tensor(self, name: str, values: np.ndarray) -> Parts:
        """Appends an F32 tensor (1-D)."""
        offset = len(self.blob) + (-len(self.blob) % ALIGN)
        self.blob += b"\0" * (offset - len(self.blob)) + np.asarray(values, np.float32).tobytes()
        self.tensors.append([name, [len(values)], 0, offset])
        return self


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(data: bytes, at: int, kind: int) -> int:
    if kind == STRING:
        return at + 8 + struct.unpack_from("<Q", data, at)[0]
    if kind == ARRAY:
        item, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if item == STRING:
            for _ in range(count):
                at = _skip_value(data, at, item)
            return at
        return at + count * SCALAR_BYTES[item]
    return at + SCALAR_BYTES[kind]


def parse(path: Path) -> Parts:
    data = path.read_bytes()
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    at, kvs, tensors = 24, [], []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, at)[0]
        key = data[at + 8:at + 8 + n].decode()
        kind = struct.unpack_from("<I", data, at + 8 + n)[0]
        start = at + 12 + n
        at = _skip_value(data, start, kind)
        kvs.append((key, kind, data[start:at]))
    for _ in range(n_tensors):
        n = struct.unpack_from("<Q", data, at)[0]
        name = data[at + 8:at + 8 + n].decode()
        at += 8 + n
        dims = struct.unpack_from("<I", data, at)[0]
        shape = list(struct.unpack_from(f"<{dims}Q", data, at + 4))
        at += 4 + 8 * dims
        qtype, offset = struct.unpack_from("<IQ", data, at)
        at += 12
        tensors.append([name, shape, qtype, offset])
    return Parts(kvs, tensors, data[at + (-at % ALIGN):])


def write(path: Path, parts: Parts) -> Path:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(parts.tensors), len(parts.kvs)))
    for key, kind, raw in parts.kvs:
        out += _string(key) + struct.pack("<I", kind) + raw
    for name, shape, qtype, offset in parts.tensors:
        out += _string(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *shape) + struct.pack("<IQ", qtype, offset)
    out += b"\0" * (-len(out) % ALIGN) + parts.blob
    path.write_bytes(bytes(out))
    return path


def base() -> Parts:
    return parse(gguf_fixture("qwen2", qtypes={"linear": "Q8_0"}))


def tokens_array(n: int) -> bytes:
    return struct.pack("<IQ", STRING, n) + b"".join(_string(f"t{i}") for i in range(n))


# ---- the metadata ------------------------------------------------------------------------------

BAD_METADATA = {  # key: (value type, bytes), what the message names
    "qwen2.block_count": [(I32, struct.pack("<i", -1)), (U32, struct.pack("<I", 0))],
    "qwen2.attention.head_count": [(U32, struct.pack("<I", 0)), (I32, struct.pack("<i", -4))],
    "qwen2.embedding_length": [(STRING, _string("abc"))],
    "qwen2.context_length": [(I32, struct.pack("<i", -5))],
    "qwen2.rope.dimension_count": [(I32, struct.pack("<i", -2))],
    "qwen2.rope.freq_base": [(F32, struct.pack("<f", float("nan"))), (F32, struct.pack("<f", -1.0))],
    "qwen2.attention.layer_norm_rms_epsilon": [(F32, struct.pack("<f", -1.0))],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD_METADATA.items() for v in vs])
def test_impossible_sizes_in_the_metadata_are_refused(key: str, value: tuple[int, bytes], tmp_path: Path) -> None:
    """Zero or negative block/head counts, a string for a size, a NaN rope base: GGUFCorrupt naming
    the key (they were IndexError, ZeroDivisionError, ValueError, or a graph making NaN)."""
    path = write(tmp_path / "bad.gguf", base().set(key, *value))
    with pytest.raises(GGUFCorrupt, match=key.replace(".", r"\.")):
        read_model(path)


@pytest.mark.parametrize("count", [100, 500])
def test_a_token_list_not_the_embedding_length_is_refused(count: int, tmp_path: Path) -> None:
    """llama.cpp refuses it too: ids past the list would decode to nothing, ids past the embedding fail."""
    path = write(tmp_path / "tokens.gguf", base().set("tokenizer.ggml.tokens", ARRAY, tokens_array(count)))
    with pytest.raises(GGUFCorrupt, match=f"{count:,} tokens but token_embd.weight has 384 rows"):
        read_model(path)


def test_a_huge_context_is_served_capped(tmp_path: Path) -> None:
    """A context of 2^40 positions would make 8 TiB rope tables (MemoryError): served MAX_CONTEXT."""
    path = write(tmp_path / "ctx.gguf", base().set("qwen2.context_length", U64, struct.pack("<Q", 1 << 40)))
    assert read_model(path).context_length == MAX_CONTEXT


def test_hostile_metadata_is_an_import_refusal_and_the_store_stays_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "heads.gguf", base().set("qwen2.attention.head_count", U32, struct.pack("<I", 0)))
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ImportRefused, match=r"head_count is 0"):
        import_gguf(path, store, check=False, progress=lambda _: None)
    assert not store.root.exists() or not any(store.root.iterdir())


def test_a_fifo_named_gguf_is_refused_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ImportRefused, match="neither a regular file nor a folder"):
        import_model(fifo, ModelStore(tmp_path / "models"), progress=lambda _: None)


@pytest.mark.parametrize("name", ["..", ".cache", ".import-x"])
def test_a_name_the_store_would_hide_is_refused(name: str, tmp_path: Path) -> None:
    """A folder starting with "." is never listed (nor found by rm): the import would vanish."""
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ImportRefused, match="cannot start with '.'"):
        import_gguf(gguf_fixture("qwen2", qtypes={"linear": "Q8_0"}), store, name=name, check=False,
                    progress=lambda _: None)
    assert not store.root.exists() or not any(store.root.iterdir())


# ---- the tensor table and the metadata's structure ---------------------------------------------

def test_overlapping_or_misaligned_tensor_data_is_refused(tmp_path: Path) -> None:
    parts = base()
    parts.tensor("blk.0.attn_k.weight")[3] = 0  # on top of token_embd.weight
    with pytest.raises(GGUFCorrupt, match="overlap"):
        GGUFFile(write(tmp_path / "overlap.gguf", parts))
    parts = base()
    parts.tensor("blk.0.attn_k.weight")[3] += 1
    with pytest.raises(GGUFCorrupt, match="not a multiple of the alignment"):
        GGUFFile(write(tmp_path / "misaligned.gguf", parts))


def test_dims_whose_product_overflows_are_not_taken_for_an_empty_tensor(tmp_path: Path) -> None:
    """2^32 x 2^32 elements wrapped to 0 bytes in int64 and passed the bounds check."""
    parts = base()
    parts.tensor("blk.0.attn_q.weight")[1] = [1 << 32, 1 << 32]
    with pytest.raises(GGUFCorrupt, match="truncated: tensor blk.0.attn_q.weight ends at byte"):
        GGUFFile(write(tmp_path / "overflow.gguf", parts))


def test_arrays_of_arrays_are_refused_without_recursing(tmp_path: Path) -> None:
    """llama.cpp does not read them; nested 5,000 deep they were a RecursionError in both readers."""
    deep = struct.pack("<IQ", ARRAY, 1) + struct.pack("<IIQ", ARRAY, ARRAY, 1) * 5000 + struct.pack("<IIQ", ARRAY, U32, 0)
    for key in ("general.deep", "tokenizer.deep"):
        path = write(tmp_path / "deep.gguf", base().set(key, ARRAY, deep))
        with pytest.raises(GGUFCorrupt, match="array of arrays"):
            GGUFFile(path)
        with pytest.raises(GGUFMetadataError, match="array of arrays"):
            read_metadata(path)


# ---- the chat template and the check --------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "{% for i in range(10**12) %}x{% endfor %}",  # the sandbox's range limit: OverflowError
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # RecursionError
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox's SecurityError
])
def test_a_hostile_chat_template_fails_the_request_not_the_server(template: str, tmp_path: Path) -> None:
    path = write(tmp_path / "template.gguf", base().set("tokenizer.chat_template", STRING, _string(template)))
    write_tokenizer(path, tmp_path)
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        TokenizerBundle(tmp_path).render_chat([{"role": "user", "content": "hi"}])


def test_check_refuses_a_source_link_to_a_fifo_or_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenwire.json").write_text('{"id": "m:q8_0", "source": {}}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (folder / gguf_check.SOURCE_LINK).symlink_to(fifo)
    # A FIFO with no writer blocks open() forever: the check must not open it.
    done: list = []
    worker = threading.Thread(target=lambda: done.append(_check_error(folder)), daemon=True)
    worker.start()
    worker.join(10)
    assert done and "is gone" in done[0], "the check blocked on (or accepted) a FIFO"
    (folder / gguf_check.SOURCE_LINK).unlink()
    (tmp_path / "text.gguf").write_text("not a GGUF at all\n")
    (folder / gguf_check.SOURCE_LINK).symlink_to(tmp_path / "text.gguf")
    assert "cannot read" in _check_error(folder)


def _check_error(folder: Path) -> str:
    try:
        gguf_check.check_model(folder, write=False)
    except CheckError as exc:
        return str(exc)
    return "no CheckError"


# ---- rope scalings of real files: graph and reference against transformers -------------------------

def _rope_scaled_file(tmp_path: Path, kind: str):
    """(a transformers model, its GGUF) with phi3's longrope (an original context of 16 in 64: the
    long factors, as llama.cpp and transformers both pick them for a sequence past 16) or qwen2's YaRN."""
    rng = np.random.default_rng(5)
    if kind == "longrope":
        long, short = [float(x) for x in 1 + 4 * rng.random(32)], [float(x) for x in 1 + 0.5 * rng.random(32)]
        model = random_hf_model("phi3", seed=1, max_position_embeddings=64, original_max_position_embeddings=16,
                                rope_scaling={"type": "longrope", "long_factor": long, "short_factor": short})
        path = from_transformers(model, tmp_path / "longrope.gguf", "phi3", {"linear": "Q8_0"})
        parts = parse(path).add_tensor("rope_factors_long.weight", long).add_tensor("rope_factors_short.weight", short)
        parts.set("phi3.rope.scaling.attn_factor", F32, struct.pack("<f", math.sqrt(1 + math.log(4) / math.log(16))))
        parts.set("phi3.rope.scaling.original_context_length", U32, struct.pack("<I", 16))
    else:
        model = random_hf_model("qwen2", seed=2, max_position_embeddings=64,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
        path = from_transformers(model, tmp_path / "yarn.gguf", "qwen2", {"linear": "Q8_0"})
        parts = parse(path).set("qwen2.rope.scaling.type", STRING, _string("yarn"))
        parts.set("qwen2.rope.scaling.factor", F32, struct.pack("<f", 4.0))
        parts.set("qwen2.rope.scaling.original_context_length", U32, struct.pack("<I", 16))
    return model, write(path, parts)


@pytest.mark.parametrize("kind", ["longrope", "yarn"])
def test_rope_scaled_files_decode_as_transformers_in_graph_and_reference(kind: str, tmp_path: Path) -> None:
    """The reference ignored phi3's rope factors and attn_factor (14 logits off transformers on this
    file: `tokenwire check` of a phi-3.5 or phi-4-mini GGUF would report a sound import as broken) and
    refused YaRN files outright (`tokenwire import` of one failed after installing it)."""
    import torch
    from test_gguf_import import assert_close_to, decode_both_ways

    model, path = _rope_scaled_file(tmp_path, kind)
    tokens = [int(t) for t in np.random.default_rng(3).integers(3, len(vocab().tokens), 24)]
    with torch.no_grad():
        truth = model(torch.tensor([tokens]), use_cache=False).logits[0].numpy()
    reference = reference_logits(path, tokens)
    assert np.abs(reference - truth).max() < 1e-3 * np.abs(truth).max()
    folder = import_gguf(path, ModelStore(tmp_path / "models"), name=kind, check=False, progress=lambda _: None).folder
    fresh, cached = decode_both_ways(folder, tokens)
    assert_close_to(truth, fresh, f"{kind} prefilled")
    assert_close_to(truth, cached, f"{kind} decoded")
