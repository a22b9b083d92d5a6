"""The native graph's paged KV cache (server/engine/paged_engine.py) on the real default model:
each sequence holds the pages its own length needs, rows decode the same alone or in a batch,
a cached prefix restores exactly, and the pool grows and compacts without changing a logit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.paged_engine import GROW_MIN, PagedEngine


@pytest.fixture(scope="module")
def engine_for(int4_dir: Path):
    def make() -> PagedEngine:
        engine = FastEngine(int4_dir, context_length=4096)
        assert isinstance(engine, PagedEngine), "the default model's native graph keeps its KV in pages"
        return engine
    return make


def tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, 20000, n)]


def run_alone(engine: PagedEngine, prompt: list[int], steps: int) -> list[np.ndarray]:
    state = engine.new_prefill()
    out = [engine.prefill(state, prompt)]
    engine.join(state)
    for _ in range(steps):
        out.append(engine.step([int(np.argmax(out[-1]))])[0].copy())
    engine.remove([0])
    return out


def test_rows_decode_alike_alone_and_in_a_batch(engine_for) -> None:
    engine = engine_for()
    prompts = [tokens(1, 300), tokens(2, 7), tokens(3, 33)]
    alone = [run_alone(engine, p, 6) for p in prompts]
    batch = engine_for()
    last = []
    for p in prompts:
        state = batch.new_prefill()
        last.append(batch.prefill(state, p))
        batch.join(state)
    for i, row in enumerate(last):
        assert np.array_equal(row, alone[i][0])
    for step in range(6):
        logits = batch.step([int(np.argmax(x)) for x in last])
        last = [logits[i].copy() for i in range(len(prompts))]
        for i in range(len(prompts)):
            assert np.array_equal(last[i], alone[i][step + 1]), f"row {i} step {step}"


def test_memory_follows_each_sequence_s_own_length(engine_for) -> None:
    """15 short chats and a long one hold their own pages, not 16 rows of the longest."""
    engine = engine_for()
    lengths = [40] * 15 + [1000]
    for i, n in enumerate(lengths):
        state = engine.new_prefill()
        engine.prefill(state, tokens(10 + i, n))
        engine.join(state)
    engine.step([5] * len(lengths))
    own = sum(engine.kv_bytes_for(n + 1) for n in lengths)
    assert engine.kv_bytes_used == own == engine.pages_used * engine.page_bytes
    assert engine.kv_bytes == sum(b.nbytes for b in engine._pool), "kv_bytes is what the buffers hold"
    assert engine.kv_bytes <= 1.2 * own + GROW_MIN * engine.page_bytes
    assert engine.kv_bytes < len(lengths) * engine.kv_bytes_for(1001) / 4
    engine.remove(list(range(len(lengths))))
    assert engine.pages_used == 0 and engine.pages_total == GROW_MIN, "an idle engine gives its pool back"


def test_prefix_restores_exactly(engine_for) -> None:
    engine, reference = engine_for(), engine_for()
    head, tail = tokens(4, 300), tokens(5, 20)
    ref_state = reference.new_prefill()  # head then tail, two chunks of one sequence
    reference.prefill(ref_state, head)
    ref_logits = reference.prefill(ref_state, tail)
    state = engine.new_prefill()
    engine.prefill(state, head)
    engine.join(state)
    kv = engine.row_cache(0)  # what the prefix cache keeps
    assert kv[0].shape == (1, engine.kv_heads, len(head), engine.head_dim)
    engine.remove([0])
    restored = engine.new_prefill(kv, len(head))
    assert np.array_equal(engine.prefill(restored, tail), ref_logits)


def test_compaction_and_trim_move_no_logit_of_a_live_row(engine_for) -> None:
    """A long row grows the pool and leaves: the pool compacts under a row still decoding (its pages
    renumbered), then trim gives back the spare pages; that row's logits stay bit-identical to a
    row that never shared an engine."""
    engine, reference = engine_for(), engine_for()
    head = tokens(4, 300)
    filler = engine.new_prefill()  # the long row takes the low pages, the live row the ones after
    engine.prefill(filler, tokens(6, 1200))
    engine.join(filler)
    logits = []
    for e in (engine, reference):
        state = e.new_prefill()
        logits.append(e.prefill(state, head))
        e.join(state)
    grown, before = engine.pages_total, list(engine._row_pages[1])
    engine.remove([0])
    assert engine.pages_total < grown and engine._row_pages[0] != before, "the live row's pages moved"
    nxt = int(np.argmax(logits[1]))
    for step in range(20):  # 300 + 20 positions: a new page on the way
        a, b = engine.step([nxt])[0].copy(), reference.step([nxt])[0]
        assert np.array_equal(a, b), f"step {step}"
        nxt = int(np.argmax(a))
    engine.trim()
    assert engine.pages_total == max(GROW_MIN, engine.pages_used + engine.pages_used // 8)
    assert np.array_equal(engine.step([nxt])[0], reference.step([nxt])[0])
