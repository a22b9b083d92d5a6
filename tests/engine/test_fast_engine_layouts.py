"""FastEngine's device-buffer path and the CUDA KV layout (fp16), checked on this CPU.

There is no GPU here, so the CUDA path is covered by its two halves: the buffer management
(device-owned OrtValues, synced to the host only when rows join or leave) forced on CPU,
and the fp16-KV graph run by the CPU provider.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenwire.server.build.fast_graph import NATIVE_GRAPH, build_fast_graph
from tokenwire.server.build.pull import BUILD_VERSION, _current, native_kernels_wanted
from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.tokenizer import TokenizerBundle


def _scenario(engine: FastEngine) -> list[np.ndarray]:
    """Chunked prefill, joins, a leave, a prefix reload and growth past the first capacity."""
    out = []
    state = engine.new_prefill()
    engine.prefill(state, list(range(200, 230)))
    out.append(engine.prefill(state, list(range(300, 310))))
    engine.join(state)
    out += [engine.step([7])[0].copy() for _ in range(3)]
    state = engine.new_prefill()
    out.append(engine.prefill(state, list(range(400, 420))))
    engine.join(state)
    out += [engine.step([7, 9]).copy() for _ in range(3)]
    cache = engine.row_cache(0)
    engine.remove([0])
    out += [engine.step([11]).copy() for _ in range(2)]
    state = engine.new_prefill(cache, cache[0].shape[2])
    out.append(engine.prefill(state, [5, 6]))
    engine.join(state)
    out += [engine.step([12, 13]).copy() for _ in range(260)]  # past the 256 positions allocated first
    return out


def test_device_buffers_decode_exactly_like_host_buffers(int4_dir: Path) -> None:
    # Dense rows on both sides: device buffers run onnxruntime's graph (the native graph is paged).
    host = FastEngine(int4_dir, context_length=512, kernels="onnxruntime")
    device = FastEngine(int4_dir, context_length=512, device_buffers=True)
    assert device.kernels == host.kernels == "onnxruntime"
    assert device.device_buffers and not host.device_buffers
    expected, got = _scenario(host), _scenario(device)
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert np.array_equal(a, b), f"output {i} differs by {np.abs(a - b).max()}"
    assert device.lengths == host.lengths


def test_reset_after_a_failed_step_reads_nothing_back(int4_dir: Path) -> None:
    """After a failed step the scheduler resets the engine: the device buffers are dropped unread
    (a device in an error state would fail the copy back too), and the engine serves again."""

    class Unreadable:
        def numpy(self):
            raise RuntimeError("device in an error state")

    engine = FastEngine(int4_dir, context_length=512, device_buffers=True)
    state = engine.new_prefill()
    engine.prefill(state, [1, 2, 3])
    engine.join(state)
    engine.step([4])
    key, buffers, io, values = engine._bindings["decode"]
    engine._bindings["decode"] = (key, buffers, io, [Unreadable()] * len(values))
    engine.reset()
    assert engine.lengths == [] and not engine._bindings
    state = engine.new_prefill()
    engine.prefill(state, [1, 2, 3])
    engine.join(state)
    assert np.isfinite(engine.step([4])).all()


@pytest.fixture(scope="module")
def fp16_kv_dir(fp32_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16kv")
    build_fast_graph(fp32_dir, out, kv_dtype="float16")
    return out


def test_cuda_layout_keeps_fp16_kv_and_decodes_like_fp32(fp16_kv_dir: Path, int4_dir: Path) -> None:
    fp16 = FastEngine(fp16_kv_dir, context_length=256)
    fp32 = FastEngine(int4_dir, context_length=256, kernels="onnxruntime")  # the same linears as fp16's graph
    assert fp16.dtype == np.float16 and fp32.dtype == np.float32
    tok = TokenizerBundle(int4_dir)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    tokens = {}
    for name, engine in (("fp16", fp16), ("fp32", fp32)):
        state = engine.new_prefill()
        logits = engine.prefill(state, ids)
        engine.join(state)
        tokens[name] = []
        for _ in range(12):
            tokens[name].append(int(np.argmax(logits)))
            logits = engine.step([tokens[name][-1]])[0]
        tokens[name + "_last"] = logits
    assert tokens["fp16"] == tokens["fp32"]
    assert np.abs(tokens["fp16_last"] - tokens["fp32_last"]).max() < 0.5


def test_cuda_layout_kv_cache_matches_full_recompute(fp16_kv_dir: Path) -> None:
    cached, full = FastEngine(fp16_kv_dir, context_length=256), FastEngine(fp16_kv_dir, context_length=256)
    seq = list(range(1000, 1030))
    state = cached.new_prefill()
    logits = cached.prefill(state, seq)
    cached.join(state)
    for step in range(8):
        recomputed = full.prefill(full.new_prefill(), seq)
        assert int(np.argmax(logits)) == int(np.argmax(recomputed)), f"step {step}"
        # fp16 K/V (rounding ~5e-4 relative) read along two kernel paths (one row vs many).
        assert np.abs(logits - recomputed).max() < 0.25
        seq.append(int(np.argmax(logits)))
        logits = cached.step([seq[-1]])[0]


@pytest.mark.cpu_flags("avx2", "fma", "f16c")  # where the native kernels run
def test_pull_rebuilds_when_the_kv_layout_differs(tmp_path: Path, int4_dir: Path) -> None:
    (tmp_path / "config.json").write_text((int4_dir / "config.json").read_text())
    (tmp_path / "tokenwire.json").write_text(json.dumps({"build": BUILD_VERSION, "graph": "gqa", "kv_dtype": "float32"}))
    # This machine runs the native kernels, so a CPU-layout folder without their graph is stale.
    assert native_kernels_wanted("float32") and not native_kernels_wanted("float16")
    assert not _current(tmp_path, "float32")
    (tmp_path / NATIVE_GRAPH).write_bytes(b"")
    assert _current(tmp_path, "float32")
    assert not _current(tmp_path, "float16")
    (tmp_path / "tokenwire.json").write_text(json.dumps({"build": BUILD_VERSION - 1, "graph": "gqa"}))
    assert not _current(tmp_path, "float32")


@pytest.mark.cpu_flags("avx2", "fma", "f16c")
def test_pull_rebuilds_when_the_native_cache_format_differs(tmp_path: Path, int4_dir: Path, monkeypatch) -> None:
    """TOKENWIRE_KV_FORMAT picks the native graph's cache format; a folder built with the other is stale."""
    from tokenwire.server.build.pull import BuildError, native_kv_format

    (tmp_path / "config.json").write_text((int4_dir / "config.json").read_text())
    (tmp_path / NATIVE_GRAPH).write_bytes(b"")
    native = {"graph": NATIVE_GRAPH, "kv_layout": "paged", "kv_format": "int8"}
    (tmp_path / "tokenwire.json").write_text(json.dumps({"build": BUILD_VERSION, "graph": "gqa",
                                                         "kernels": {"native": native}}))
    monkeypatch.delenv("TOKENWIRE_KV_FORMAT", raising=False)
    assert native_kv_format() == "float16" and not _current(tmp_path, "float32")
    monkeypatch.setenv("TOKENWIRE_KV_FORMAT", "int8")
    assert native_kv_format() == "int8" and _current(tmp_path, "float32")
    monkeypatch.setenv("TOKENWIRE_KV_FORMAT", "int4")
    with pytest.raises(BuildError, match="TOKENWIRE_KV_FORMAT must be one of float16, int8, not 'int4'"):
        native_kv_format()
