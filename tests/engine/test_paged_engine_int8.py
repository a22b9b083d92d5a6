"""The paged pool in the native graph's int8 cache format (engine/kv_int8.py, server/native/tw_kv8.c)
on the default model's weights: a cached prefix restores byte for byte however it was cut, and
the format picks the tokens fp16 picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenwire.server.build.fast_graph import build_fast_graph
from tokenwire.server.engine import kv_int8
from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.paged_engine import PagedEngine

pytestmark = pytest.mark.cpu_flags("avx2", "fma", "f16c")


@pytest.fixture(scope="module")
def int8_dir(int4_dir: Path, fp32_dir: Path, tmp_path_factory) -> Path:
    """The default model with its native graph rebuilt for the int8 cache format."""
    out = tmp_path_factory.mktemp("int8_cache")
    for f in int4_dir.iterdir():
        if not f.name.startswith("model_native"):
            (out / f.name).symlink_to(f)
    build_fast_graph(fp32_dir, out, bits=4, native=True, kv_format="int8")
    return out


@pytest.fixture(scope="module")
def int8_engine(int8_dir: Path) -> PagedEngine:
    engine = FastEngine(int8_dir, context_length=1024)
    assert isinstance(engine, PagedEngine) and engine.int8
    return engine


def _tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, 20000, n)]


def _greedy(engine: PagedEngine, prompt: list[int], steps: int) -> list[int]:
    state = engine.new_prefill()
    logits = engine.prefill(state, prompt)
    engine.join(state)
    out = [int(np.argmax(logits))]
    for _ in range(steps):
        out.append(int(np.argmax(engine.step([out[-1]])[0])))
    engine.remove([0])
    return out


def test_entries_convert_both_ways_exactly() -> None:
    """keys_to_entry / entry_to_keys: every key block's scales and minimums travel with each position."""
    d, blocks = 32, 3
    rows = np.random.default_rng(0).integers(0, 256, (2, blocks * kv_int8.BLOCK, kv_int8.row_bytes(d))).astype(np.uint8)
    for length in (48, 40, 17, 1):
        entry = kv_int8.keys_to_entry(rows, length, d)
        assert entry.shape == (2, length, kv_int8.entry_width(d, key=True))
        back = kv_int8.entry_to_keys(entry, d)
        n = -(-length // kv_int8.BLOCK) * kv_int8.BLOCK
        assert np.array_equal(back[:, :length], rows[:, :length])
        assert np.array_equal(back[:, :n, d:], rows[:, :n, d:]), "the tails (scales, minimums) come back whole"
        with np.errstate(invalid="ignore", over="ignore"):  # random bytes: some halves are NaN or inf
            np.testing.assert_array_equal(kv_int8.dequantize_keys(back, length, d),
                                          kv_int8.dequantize_keys(rows, length, d))


def test_int8_pool_restores_a_prefix_exactly_even_cut_mid_block(int8_engine: PagedEngine, int8_dir: Path) -> None:
    """row_cache -> new_prefill keeps every byte, so a restored prefix decodes bit for bit like the
    sequence it came from; an entry cut at any position (as the prefix cache and the disk tier cut
    them) restores to the same entry."""
    engine, reference = int8_engine, FastEngine(int8_dir, context_length=1024)
    assert engine.row_width == engine.head_dim + engine.head_dim // 4  # 0.625x fp16's bytes
    assert engine.page_bytes == engine.kv_bytes_for(16) == 16 * 2 * engine.layers * engine.kv_heads * engine.row_width
    head, tail = _tokens(4, 120), _tokens(5, 20)
    ref_state = reference.new_prefill()
    reference.prefill(ref_state, head)
    ref_logits = reference.prefill(ref_state, tail)
    reference.join(ref_state)
    state = engine.new_prefill()
    engine.prefill(state, head)
    engine.join(state)
    kv = engine.row_cache(0)
    assert kv[0].shape == (1, engine.kv_heads, len(head), 5 * engine.head_dim) and kv[0].dtype == np.uint8
    assert kv[1].shape == (1, engine.kv_heads, len(head), engine.row_width)
    engine.remove([0])
    restored = engine.new_prefill(kv, len(head))
    logits = engine.prefill(restored, tail)
    engine.join(restored)
    assert np.array_equal(logits, ref_logits)
    for _ in range(3):
        nxt = int(np.argmax(logits))
        logits = engine.step([nxt])[0].copy()
        assert np.array_equal(logits, reference.step([nxt])[0])
    cut = 99  # mid block
    part = [np.ascontiguousarray(np.take(t, np.arange(cut), axis=2)) for t in kv]
    again = engine.new_prefill(part, cut)
    engine.join(again)
    assert all(np.array_equal(a, b) for a, b in zip(engine.row_cache(1), part, strict=True))
    engine.remove([0, 1])


def test_int8_and_fp16_caches_pick_the_same_tokens(int4_dir: Path, int8_engine: PagedEngine) -> None:
    prompt = _tokens(8, 200)
    assert _greedy(FastEngine(int4_dir, context_length=1024), prompt, 12) == _greedy(int8_engine, prompt, 12)
