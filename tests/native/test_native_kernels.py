"""tokenwire's native Linear op (server/native): packing, the op in a real onnxruntime
session, the decoding graph built on it, and the choice between it and onnxruntime's kernels.

The op computes Q4_1 / Q8_0 weights exactly with activations rounded to int16 per block of 32,
so against an fp64 reference its relative error is ~3e-5; every row is computed alike whatever
the number of rows, so a sequence decodes bit for bit the same alone or in a batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tokenwire.server.build.fast_graph import NATIVE_GRAPH, build_fast_graph, full_logits
from tokenwire.server.build.native_pack import DOMAIN, NativeEmitter, dequantize, pack
from tokenwire.server.build.quantize import BLOCK, quantize_weight
from tokenwire.server.engine.fast_engine import FastEngine
from tokenwire.server.engine.graph import choose_kernels
from tokenwire.server.engine.optimum_engine import OptimumEngine
from tokenwire.server.engine.session import make_session
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.models.store import read_manifest
from tokenwire.server.native import loader as native_kernels

# The kernels need AVX2, FMA and F16C (server/native/tw_isa.c); elsewhere these are allowed skips.
pytestmark = pytest.mark.cpu_flags("avx2", "fma", "f16c")


def _grid_weight(rng: np.random.Generator, k: int, n: int, bits: int) -> np.ndarray:
    """A [K, N] weight on llama.cpp's Q4_1 (bits 4) or Q8_0 (bits 8) grid."""
    kb = k // BLOCK
    if bits == 4:
        q = rng.integers(0, 16, (k, n))
        q[0::BLOCK], q[1::BLOCK] = 0, 15  # each block spans its full range, as Q4_1 blocks do
        d, m = rng.random((kb, 1, n)) * 0.01 + 1e-3, -rng.random((kb, 1, n)) * 0.05
        return (q.reshape(kb, BLOCK, n) * d + m).reshape(k, n).astype(np.float32)
    q = rng.integers(-127, 128, (k, n))
    q[0::BLOCK] = 127
    d = rng.random((kb, 1, n)) * 0.001 + 1e-4
    return (q.reshape(kb, BLOCK, n) * d).reshape(k, n).astype(np.float32)


def _nbits_dequantized(qw, k: int, n: int) -> np.ndarray:
    """What MatMulNBits (+ the Q4_1 correction) computes with a QuantizedWeight: [K, N] fp64."""
    kb = k // BLOCK
    d = qw.scales.reshape(n, kb).astype(np.float64)
    if qw.bits == 4:
        codes = np.empty((n, kb, BLOCK), dtype=np.uint8)
        packed = qw.codes.reshape(n, kb, BLOCK // 2)
        codes[..., 0::2], codes[..., 1::2] = packed & 0x0F, packed >> 4
        zp_packed = qw.zero_points.reshape(n, -1)
        zp = np.empty((n, zp_packed.shape[1] * 2), dtype=np.uint8)
        zp[:, 0::2], zp[:, 1::2] = zp_packed & 0x0F, zp_packed >> 4
        w = (codes - zp[:, :kb, None].astype(np.float64)) * d[..., None]
        if qw.mins is not None:
            w += qw.mins.T[..., None]
    else:
        zp = qw.zero_points.reshape(n, kb).astype(np.float64)
        w = (qw.codes.reshape(n, kb, BLOCK) - zp[..., None]) * d[..., None]
    return w.reshape(n, k).T


@pytest.mark.parametrize(("bits", "lm_head", "grid", "route"), [
    (4, False, True, "q4_1"), (4, False, False, "asym4"), (8, True, True, "q8_0"), (8, True, False, "asym8")])
def test_packing_keeps_every_route_exact(bits: int, lm_head: bool, grid: bool, route: str) -> None:
    rng = np.random.default_rng(bits)
    k, n = 96, 40  # N not a multiple of the 16-column tile: padding must not leak
    w = _grid_weight(rng, k, n, bits) if grid else rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize_weight(w, bits, lm_head=lm_head)
    assert qw.route == route
    packed = pack(qw, k, n)
    # exact up to float32 rounding of the folded minimum (m = -d·zp)
    np.testing.assert_allclose(dequantize(packed), _nbits_dequantized(qw, k, n), rtol=1e-6, atol=1e-6)
    if grid:
        np.testing.assert_allclose(dequantize(packed), w, rtol=1e-5, atol=1e-6)


def _linear_session(w: np.ndarray, bits: int, lm_head: bool) -> ort.InferenceSession:
    em = NativeEmitter()
    em.linear("x", w, "y", "w", bits, 0, lm_head=lm_head)
    graph = helper.make_graph(
        em.nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=em.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(native_kernels.require()))
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("bits", "lm_head", "grid", "k", "n"), [
    (4, False, True, 576, 960), (4, False, True, 1536, 576), (4, False, False, 64, 40),
    (8, True, True, 576, 1000), (8, True, False, 64, 24)])
def test_linear_op_matches_fp64_and_is_row_independent(bits: int, lm_head: bool, grid: bool, k: int, n: int) -> None:
    rng = np.random.default_rng(k + n)
    w = _grid_weight(rng, k, n, bits) if grid else rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize_weight(w, bits, lm_head=lm_head)
    exact = _nbits_dequantized(qw, k, n)
    session = _linear_session(w, bits, lm_head)
    for shape in ((1, k), (5, k), (40, k), (2, 3, k)):
        x = rng.standard_normal(shape).astype(np.float32)
        x[..., :BLOCK] *= 50  # a block with an outlier: per-block scales keep the others precise
        y = session.run(None, {"x": x})[0]
        assert y.shape == (*shape[:-1], n)
        ref = x.astype(np.float64) @ exact
        assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4
    x = rng.standard_normal((9, k)).astype(np.float32)
    batch = session.run(None, {"x": x})[0]
    for row in (0, 4, 8):
        assert np.array_equal(session.run(None, {"x": x[row:row + 1]})[0][0], batch[row])


def test_linear_op_refuses_an_input_of_the_wrong_width() -> None:
    rng = np.random.default_rng(3)
    session = _linear_session(_grid_weight(rng, 64, 32, 4), 4, False)
    with pytest.raises(Exception, match="not K"):
        session.run(None, {"x": np.ones((1, 96), dtype=np.float32)})
    assert session.run(None, {"x": np.ones((1, 64), dtype=np.float32)})[0].shape == (1, 32)


@pytest.mark.slow  # compiles, or reruns this file in a child pytest
def test_library_builds_from_scratch_and_reports_why_not(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENWIRE_NATIVE_CACHE", str(tmp_path / "cache"))
    built = native_kernels._find()
    assert built.path is not None and built.path.is_relative_to(tmp_path / "cache"), built.reason
    monkeypatch.setenv("TOKENWIRE_NATIVE_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "/bin/false")
    failed = native_kernels._find()
    assert failed.path is None and "compiling the native kernels failed" in failed.reason


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_library_runs_the_instruction_set_asked_for() -> None:
    """AVX-512 where the CPU has it (with VNNI), else AVX2; AVX2 when TOKENWIRE_NATIVE_ISA=avx2
    (the child run below)."""
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= _cpu_flags()
    expected = os.environ.get("TOKENWIRE_NATIVE_ISA") or ("avx512" if avx512 else "avx2")
    assert native_kernels.library().isa == expected


def test_only_avx512_functions_hold_avx512_instructions() -> None:
    """On a CPU without AVX-512 an AVX-512 instruction is SIGILL: the whole process dies. Code
    compiled for AVX-512 must sit only in functions the run-time dispatch calls on AVX-512
    machines, which are named so (a merge loop once compiled for AVX-512 and called on every
    CPU crashed AVX2 machines in `tokenwire pull`)."""
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(native_kernels.require())],
                                 capture_output=True, text=True, check=True).stdout
    function, offenders, seen = "", set(), set()
    for line in disassembly.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
        elif "%zmm" in line or "%k1" in line:
            (seen if "avx512" in function else offenders).add(function)
    assert seen, "no AVX-512 code at all: the check itself is broken"
    assert not offenders, f"AVX-512 instructions outside the AVX-512 dispatch: {sorted(offenders)}"


@pytest.mark.slow  # compiles, or reruns this file in a child pytest
def test_avx2_kernels_pass_every_test_of_this_file() -> None:
    """CPUs without AVX-512 (most laptops) run the AVX2 versions: this file again, in a child
    process forced onto them (the choice is made once per process). On such a CPU this process
    already runs them, so every other test of this file is that run: it is checked to be so, and
    not repeated."""
    if os.environ.get("TOKENWIRE_NATIVE_ISA") == "avx2":
        pytest.fail("already the AVX2 run: deselect this test there")
    if native_kernels.library().isa == "avx2":
        assert not _cpu_has_avx512(), "an AVX-512 CPU chose the AVX2 kernels unasked"
        return
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_kernels_pass"],
        env={**os.environ, "TOKENWIRE_NATIVE_ISA": "avx2"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def _cpu_has_avx512() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"))


def test_kernel_choice(int4_dir: Path, tmp_path: Path, monkeypatch) -> None:
    assert (int4_dir / NATIVE_GRAPH).is_file(), "pull builds the native graph where the machine runs it"
    assert choose_kernels(int4_dir) == ("native", "")
    assert choose_kernels(int4_dir, kernels="onnxruntime")[0] == "onnxruntime"
    assert choose_kernels(int4_dir, device="cuda")[0] == "onnxruntime"
    with pytest.raises(ValueError, match="CPU kernels"):
        choose_kernels(int4_dir, device="cuda", kernels="native")
    with pytest.raises(ValueError, match="kernels must be one of"):
        choose_kernels(int4_dir, kernels="fast")
    bare = tmp_path / "bare"
    bare.mkdir()
    kind, why = choose_kernels(bare)
    assert kind == "onnxruntime" and NATIVE_GRAPH in why
    monkeypatch.setenv("TOKENWIRE_KERNELS", "onnxruntime")
    assert choose_kernels(int4_dir)[0] == "onnxruntime"
    assert FastEngine(int4_dir, context_length=64).kernels == "onnxruntime"
    assert FastEngine(int4_dir, context_length=64, kernels="native").kernels == "native"


def test_pull_measured_both_kernels(int4_dir: Path) -> None:
    manifest = read_manifest(int4_dir)
    kinds = manifest["kernels"]
    assert kinds["native"]["graph"] == NATIVE_GRAPH and kinds["onnxruntime"]["graph"] == "model.onnx"
    for kind in ("native", "onnxruntime"):
        assert kinds[kind]["quality"]["tokens"] >= 2000
        assert kinds[kind]["quality"]["top1_agreement"] >= 0.95
    assert manifest["quality"]["top1_agreement"] == kinds["native"]["quality"]["top1_agreement"]


def _greedy(engine: FastEngine, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    state = engine.new_prefill()
    logits = engine.prefill(state, ids)
    engine.join(state)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = engine.step([out[-1]])[0]
    engine.remove([0])
    return out, logits


@pytest.fixture(scope="module")
def native_twin(fp32_dir: Path, tmp_path_factory) -> Path:
    """The native graph with every position's logits, for the no-cache reference."""
    out = tmp_path_factory.mktemp("native_twin")
    build_fast_graph(fp32_dir, out, last_only=False, native=True)
    return out


def test_native_kv_cache_decode_matches_full_recompute(int4_dir: Path, native_twin: Path) -> None:
    engine = FastEngine(int4_dir, context_length=256, kernels="native")
    tok = TokenizerBundle(int4_dir)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Name three rivers of Europe."}]))
    state = engine.new_prefill()
    cached = [engine.prefill(state, ids[:-7]), engine.prefill(state, ids[-7:])]  # chunked prefill
    engine.join(state)
    tokens = []
    for _ in range(16):
        tokens.append(int(np.argmax(cached[-1])))
        cached.append(engine.step([tokens[-1]])[0].copy())
    full = full_logits(native_twin, ids + tokens, native=True)
    recomputed = [full[len(ids) - 8], *full[len(ids) - 1:]]
    for i, (a, b) in enumerate(zip(cached, recomputed, strict=True)):
        assert np.argmax(a) == np.argmax(b), f"position {i}"
        # One-row and many-row attention differ by ~1e-6; int16 rounding of activations can
        # carry that to a few 1e-3 in the logits (measured 8e-3), far below a token's margin.
        assert np.abs(a - b).max() < 0.05, f"position {i}: {np.abs(a - b).max()}"


def test_native_rows_decode_the_same_alone_or_batched(int4_dir: Path) -> None:
    engine = FastEngine(int4_dir, context_length=256, kernels="native")
    tok = TokenizerBundle(int4_dir)
    ids = tok.encode("The longest river in Africa is")
    alone, alone_last = _greedy(engine, ids, 10)
    for other in (tok.encode("Once upon a time"), tok.encode("def fibonacci(n):\n    ")):
        state = engine.new_prefill()
        engine.prefill(state, other)
        engine.join(state)
    state = engine.new_prefill()
    logits = engine.prefill(state, ids)
    engine.join(state)
    batched = []
    for _ in range(10):
        batched.append(int(np.argmax(logits)))
        logits = engine.step([5, 6, batched[-1]])[2]
    assert batched == alone
    assert np.array_equal(logits, alone_last)


def test_native_kernels_decode_like_fp32(int4_dir: Path, fp32_dir: Path) -> None:
    """Greedy text of the native int4 graph equals fp32's (onnxruntime's int4 graph, whose
    lm_head rounds activations to int8, picks "L" over "The" at the first token of this
    prompt, where fp32 and the native graph agree); both int4 graphs' logits stay close."""
    tok = TokenizerBundle(int4_dir)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    native, native_last = _greedy(FastEngine(int4_dir, context_length=256, kernels="native"), ids, 12)
    reference, _ = _greedy(OptimumEngine(fp32_dir / "model.onnx"), ids, 12)
    assert native == reference, (tok.decode(native), tok.decode(reference))
    engines = {k: FastEngine(int4_dir, context_length=256, kernels=k) for k in ("native", "onnxruntime")}
    first = {}
    for kind, engine in engines.items():
        first[kind] = engine.prefill(engine.new_prefill(), ids)
    assert np.abs(first["native"] - first["onnxruntime"]).max() < 0.5


def test_native_session_loads_with_threads_setting(int4_dir: Path) -> None:
    session = make_session(int4_dir / NATIVE_GRAPH, threads=1, custom_ops=native_kernels.require())
    assert {n.name for n in session.get_inputs()} >= {"input_ids", "attention_mask"}


# ---- Attention ------------------------------------------------------------------------------

def _attention_session(heads: int, kv_heads: int, scale: float, paged: bool = False,
                       kv_format: str | None = None, cache_type: int | None = None) -> ort.InferenceSession:
    """The op alone; `paged`: with its optional seventh input, kv_pages (the caches are a pool of pages);
    `kv_format`: the attribute (absent: the op's default, fp16), its caches uint8 for "int8"."""
    cache = cache_type or (TensorProto.UINT8 if kv_format == "int8" else TensorProto.FLOAT16)
    specs = [("qkv", TensorProto.FLOAT), ("past_key", cache), ("past_value", cache),
             ("seqlens_k", TensorProto.INT32), ("cos", TensorProto.FLOAT), ("sin", TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in specs + [("kv_pages", TensorProto.INT32)] * paged]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("present_key", cache, None),
               helper.make_tensor_value_info("present_value", cache, None)]
    attrs = {} if kv_format is None else {"kv_format": kv_format}
    node = helper.make_node("Attention", [i.name for i in inputs], [o.name for o in outputs], domain=DOMAIN,
                            num_heads=heads, kv_num_heads=kv_heads, scale=scale, **attrs)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(native_kernels.require()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention_reference(qkv, past_k, past_v, seqlens, cos, sin, heads, kv_heads, scale):
    """GroupQueryAttention's semantics (rotary half rotation, causal, right-padded rows) in fp64,
    over the cache's fp16 values (new keys and values rounded the way the cache stores them)."""
    b, s, _ = qkv.shape
    d = past_k.shape[-1]
    key, value = past_k.astype(np.float64), past_v.astype(np.float64)
    out = np.zeros((b, s, heads * d))
    for row in range(b):
        total = seqlens[row] + 1
        pos = np.arange(total - s, total)
        x = qkv[row].astype(np.float64).reshape(s, heads + 2 * kv_heads, d)
        q = _rotate(x[:, :heads], cos[pos][:, None], sin[pos][:, None])
        k = _rotate(x[:, heads:heads + kv_heads], cos[pos][:, None], sin[pos][:, None])
        key[row, :, pos] = k.astype(np.float16).astype(np.float64)  # [s, kv_heads, d]
        value[row, :, pos] = x[:, heads + kv_heads:].astype(np.float16).astype(np.float64)
        for h in range(heads):
            g = h // (heads // kv_heads)
            for i, p in enumerate(pos):
                scores = key[row, g, :p + 1] @ q[i, h] * scale
                w = np.exp(scores - scores.max())
                out[row, i, h * d:(h + 1) * d] = (w / w.sum()) @ value[row, g, :p + 1]
    return out, key, value


@pytest.mark.parametrize(("batch", "seq", "lengths"), [
    (3, 1, (9, 1, 600)), (1, 37, (50,)), (1, 5, (5,)), (2, 1, (300, 17))])
def test_attention_op_matches_reference(batch: int, seq: int, lengths: tuple[int, ...]) -> None:
    """Decode rows of different lengths (keys split over several tasks past 256), a prompt
    chunk after a cached prefix, and a first chunk."""
    heads, kv_heads, d, cap = 6, 2, 32, 640
    rng = np.random.default_rng(batch * 100 + seq)
    qkv = rng.standard_normal((batch, seq, (heads + 2 * kv_heads) * d)).astype(np.float32)
    qkv[..., :heads * d] *= 3  # sharper attention than random data gives
    past_k = rng.standard_normal((batch, kv_heads, cap, d)).astype(np.float16)
    past_v = rng.standard_normal((batch, kv_heads, cap, d)).astype(np.float16)
    seqlens = np.asarray([n - 1 for n in lengths], dtype=np.int32)
    angles = np.outer(np.arange(1024), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    scale = d ** -0.5
    feeds = {"qkv": qkv, "past_key": past_k.copy(), "past_value": past_v.copy(), "seqlens_k": seqlens,
             "cos": cos, "sin": sin}
    out, present_k, present_v = _attention_session(heads, kv_heads, scale).run(None, feeds)
    ref, ref_k, ref_v = _attention_reference(qkv, past_k, past_v, seqlens, cos, sin, heads, kv_heads, scale)
    assert np.abs(out - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    # new positions written (within fp16 rounding of the fp64 rotation), every other position kept
    assert np.abs(present_k.astype(np.float64) - ref_k).max() < 2e-3 * np.abs(ref_k).max()
    assert np.array_equal(present_v.astype(np.float64), ref_v)
    written = np.zeros(present_k.shape[:3], dtype=bool)
    for row, n in enumerate(lengths):
        written[row, :, n - seq:n] = True
    assert np.array_equal(present_k[~written], past_k[~written])
    assert np.array_equal(feeds["past_key"], past_k), "present was a separate buffer: past left alone"


def test_attention_op_refuses_rows_beyond_the_cache() -> None:
    session = _attention_session(2, 1, 0.25)
    feeds = {"qkv": np.zeros((1, 1, 4 * 16), np.float32), "past_key": np.zeros((1, 1, 8, 16), np.float16),
             "past_value": np.zeros((1, 1, 8, 16), np.float16), "seqlens_k": np.asarray([8], np.int32),
             "cos": np.ones((32, 8), np.float32), "sin": np.zeros((32, 8), np.float32)}
    with pytest.raises(Exception, match="seqlens_k out of range"):
        session.run(None, feeds)
    feeds["seqlens_k"] = np.asarray([7], np.int32)
    assert session.run(None, feeds)[0].shape == (1, 1, 32)


@pytest.mark.parametrize(("page", "seq", "lengths"), [(16, 1, (9, 1, 600)), (32, 37, (50,)), (16, 1, (300, 17))])
def test_paged_attention_equals_dense(page: int, seq: int, lengths: tuple[int, ...]) -> None:
    """Rows whose positions live in scattered pages of one pool compute exactly what the dense
    layout computes (bit for bit), and the new positions land in the right pages."""
    heads, kv_heads, d = 6, 2, 32
    batch = len(lengths)
    per_row = -(-max(lengths) // page)
    cap = per_row * page
    rng = np.random.default_rng(page + seq)
    qkv = rng.standard_normal((batch, seq, (heads + 2 * kv_heads) * d)).astype(np.float32)
    qkv[..., :heads * d] *= 3
    dense_k = rng.standard_normal((batch, kv_heads, cap, d)).astype(np.float16)
    dense_v = rng.standard_normal((batch, kv_heads, cap, d)).astype(np.float16)
    seqlens = np.asarray([n - 1 for n in lengths], dtype=np.int32)
    angles = np.outer(np.arange(1024), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    # Each row takes only the pages its length needs, in a shuffled order, with spare pages.
    needed = [-(-n // page) for n in lengths]
    order = rng.permutation(sum(needed) + 3)
    table = np.zeros((batch, per_row), dtype=np.int32)
    pool_k = np.zeros((len(order), kv_heads, page, d), np.float16)
    pool_v = np.zeros_like(pool_k)
    at = 0
    for row, n in enumerate(needed):
        for i in range(n):
            table[row, i] = order[at]
            pool_k[order[at]] = dense_k[row, :, i * page:(i + 1) * page]
            pool_v[order[at]] = dense_v[row, :, i * page:(i + 1) * page]
            at += 1
    scale = d ** -0.5
    dense = _attention_session(heads, kv_heads, scale).run(None, {
        "qkv": qkv, "past_key": dense_k, "past_value": dense_v, "seqlens_k": seqlens, "cos": cos, "sin": sin})
    paged = _attention_session(heads, kv_heads, scale, paged=True).run(None, {
        "qkv": qkv, "past_key": pool_k, "past_value": pool_v, "seqlens_k": seqlens, "cos": cos, "sin": sin,
        "kv_pages": table})
    assert np.array_equal(paged[0], dense[0])
    for row, n in enumerate(lengths):
        gathered_k = np.concatenate([paged[1][table[row, i]] for i in range(needed[row])], axis=1)[:, :n]
        gathered_v = np.concatenate([paged[2][table[row, i]] for i in range(needed[row])], axis=1)[:, :n]
        assert np.array_equal(gathered_k, dense[1][row, :, :n])
        assert np.array_equal(gathered_v, dense[2][row, :, :n])


def test_paged_attention_refuses_pages_outside_the_pool() -> None:
    session = _attention_session(2, 1, 0.25, paged=True)
    feeds = {"qkv": np.zeros((1, 1, 4 * 16), np.float32), "past_key": np.zeros((2, 1, 16, 16), np.float16),
             "past_value": np.zeros((2, 1, 16, 16), np.float16), "seqlens_k": np.asarray([20], np.int32),
             "cos": np.ones((64, 8), np.float32), "sin": np.zeros((64, 8), np.float32),
             "kv_pages": np.asarray([[1, 2]], np.int32)}
    with pytest.raises(Exception, match="outside the pool"):
        session.run(None, feeds)
    feeds["kv_pages"] = np.asarray([[1, 0]], np.int32)
    assert session.run(None, feeds)[0].shape == (1, 1, 32)
    feeds["seqlens_k"] = np.asarray([32], np.int32)
    with pytest.raises(Exception, match="seqlens_k out of range"):
        session.run(None, feeds)


# ---- the int8 cache (kv_format "int8", server/native/tw_kv8.c) -------------------------------

def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _half(x) -> np.ndarray:
    return _f32(x).astype(np.float16).astype(np.float32)


def _codes(x: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round((x - min) / scale) clamped to 0..255, 0 where the scale is 0 (float32 arithmetic, as the C)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((_f32(x) - lo) / scale), 0, 255)
    return np.where(scale == 0, 0, q).astype(np.uint8)


def _key_tail_slots(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, byte) of each channel's fp16 scale and of its minimum in a key block: the block's 16 row
    tails (d/4 bytes each), read in order, hold the d scales and then the d minimums."""
    scale_byte, min_byte = 2 * np.arange(d), 2 * d + 2 * np.arange(d)
    per_row = d // 4
    return scale_byte // per_row, d + scale_byte % per_row, min_byte // per_row, d + min_byte % per_row


def _tail_halves(block: np.ndarray, rows: np.ndarray, at: np.ndarray) -> np.ndarray:
    return np.asarray([block[r, a:a + 2].view(np.float16)[0] for r, a in zip(rows, at, strict=True)], np.float32)


def _model_put_key(rows: np.ndarray, pos: int, x: np.ndarray, d: int) -> None:
    """The format's key writer in numpy: rows [capacity, d + d/4] uint8 of one (row, KV head)."""
    j = pos % 16
    block = rows[pos - j: pos - j + 16]
    if j == 0:
        block[:] = 0
    sr, sa, mr, ma = _key_tail_slots(d)
    scale, lo = _tail_halves(block, sr, sa), _tail_halves(block, mr, ma)
    x = _f32(x)
    if j == 0:
        lo, scale = _half(x), np.zeros(d, np.float32)
    else:
        top = _f32(lo + np.float32(255) * scale)
        wider = (x < lo) | (x > top)
        new_lo = np.where(x < lo, _half(x), lo)
        new_scale = np.where(wider, _half(_f32(np.maximum(top, x) - new_lo) / np.float32(255)), scale)
        old = _f32(lo + scale * block[:j, :d].astype(np.float32))
        block[:j, :d][:, wider] = _codes(old[:, wider], new_lo[wider], new_scale[wider])
        lo, scale = new_lo.astype(np.float32), new_scale.astype(np.float32)
    block[j, :d] = _codes(x, lo, scale)
    for c in range(d):
        block[sr[c], sa[c]:sa[c] + 2] = np.asarray([scale[c]], np.float16).view(np.uint8)
        block[mr[c], ma[c]:ma[c] + 2] = np.asarray([lo[c]], np.float16).view(np.uint8)


def _model_put_value(rows: np.ndarray, pos: int, x: np.ndarray, d: int) -> None:
    x = _f32(x)
    lo = _half(x.min())
    scale = _half(_f32(x.max() - lo) / np.float32(255))
    rows[pos] = 0
    rows[pos, :d] = _codes(x, lo, scale)
    rows[pos, d:d + 4] = np.asarray([scale, lo], dtype=np.float16).view(np.uint8)


def _model_store(cache_k, cache_v, qkv, seqlens, cos, sin, heads: int, kv_heads: int) -> None:
    """What the op writes for qkv's new positions, in the numpy model (caches [B, G, cap, R], in place)."""
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    half = d // 2
    batch, seq, _ = qkv.shape
    for row in range(batch):
        for s in range(seq):
            pos = int(seqlens[row]) + 1 - seq + s
            x = qkv[row, s].reshape(heads + 2 * kv_heads, d)
            cs, sn = cos[pos], sin[pos]
            for g in range(kv_heads):
                k = x[heads + g]
                rotated = np.concatenate([k[:half] * cs - k[half:] * sn, k[half:] * cs + k[:half] * sn])
                _model_put_key(cache_k[row, g], pos, rotated, d)
                _model_put_value(cache_v[row, g], pos, x[heads + kv_heads + g], d)


def _dequantized(cache_k, cache_v, d: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, G, cap, R] int8 caches -> float64 [B, G, cap, d] keys and values (the format read by hand)."""
    sr, sa, mr, ma = _key_tail_slots(d)
    blocks = cache_k.reshape(*cache_k.shape[:2], -1, 16, cache_k.shape[-1])

    def per_channel(rows, at):
        halves = [blocks[..., r, a:a + 2].copy().view(np.float16)[..., 0] for r, a in zip(rows, at, strict=True)]
        return np.repeat(np.stack(halves, -1).astype(np.float64), 16, axis=2)

    keys = per_channel(mr, ma) + cache_k[..., :d].astype(np.float64) * per_channel(sr, sa)
    pair = cache_v[..., d:d + 4].copy().view(np.float16).astype(np.float64)
    return keys, pair[..., 1:2] + cache_v[..., :d].astype(np.float64) * pair[..., 0:1]


def _int8_case(batch: int, seq: int, lengths: tuple[int, ...], heads=6, kv_heads=2, d=32, cap=640, seed=0):
    """Random qkv (keys with outlier channels) and int8 caches written by the model up to each row's past."""
    rng = np.random.default_rng(seed)
    width = (heads + 2 * kv_heads) * d
    angles = np.outer(np.arange(1024), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    loud = np.ones(d, np.float32)
    loud[[3, 17]] = 12  # outlier channels, as real keys have
    k = np.zeros((batch, kv_heads, cap, d + d // 4), np.uint8)
    v = np.zeros_like(k)
    for row, n in enumerate(lengths):
        past = rng.standard_normal((1, n - seq, width)).astype(np.float32)
        past[..., heads * d:(heads + kv_heads) * d] *= np.tile(loud, kv_heads)
        if n > seq:
            _model_store(k[row:row + 1], v[row:row + 1], past, np.asarray([n - seq - 1]), cos, sin, heads, kv_heads)
    qkv = rng.standard_normal((batch, seq, width)).astype(np.float32)
    qkv[..., :heads * d] *= 3
    qkv[..., heads * d:(heads + kv_heads) * d] *= np.tile(loud, kv_heads)
    seqlens = np.asarray([n - 1 for n in lengths], dtype=np.int32)
    return {"qkv": qkv, "past_key": k, "past_value": v, "seqlens_k": seqlens, "cos": cos, "sin": sin}


@pytest.mark.parametrize(("batch", "seq", "lengths"), [
    (3, 1, (9, 16, 600)), (1, 37, (50,)), (1, 5, (5,)), (2, 1, (300, 17))])
def test_int8_attention_matches_its_format_model(batch: int, seq: int, lengths: tuple[int, ...]) -> None:
    """The op writes exactly the bytes the numpy model of the format writes (keys re-rounded when a
    key widens its block's range in a channel), and attends over those values as fp64 does."""
    heads, kv_heads, d = 6, 2, 32
    feeds = _int8_case(batch, seq, lengths, heads, kv_heads, d, seed=batch * 100 + seq)
    out, present_k, present_v = _attention_session(heads, kv_heads, d ** -0.5, kv_format="int8").run(None, feeds)
    want_k, want_v = feeds["past_key"].copy(), feeds["past_value"].copy()
    _model_store(want_k, want_v, feeds["qkv"], feeds["seqlens_k"], feeds["cos"], feeds["sin"], heads, kv_heads)
    assert np.array_equal(present_k, want_k) and np.array_equal(present_v, want_v)
    keys, values = _dequantized(want_k, want_v, d)
    ref = np.zeros_like(out, dtype=np.float64)
    for row, n in enumerate(lengths):
        x = feeds["qkv"][row].astype(np.float64).reshape(seq, heads + 2 * kv_heads, d)
        pos = np.arange(n - seq, n)
        q = _rotate(x[:, :heads], feeds["cos"][pos][:, None], feeds["sin"][pos][:, None]) * d ** -0.5
        for h in range(heads):
            g = h // (heads // kv_heads)
            for i, p in enumerate(pos):
                scores = keys[row, g, :p + 1] @ q[i, h]
                w = np.exp(scores - scores.max())
                ref[row, i, h * d:(h + 1) * d] = (w / w.sum()) @ values[row, g, :p + 1]
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # and the int8 values stay close to what they stand for (keys: per-channel scales over 16 positions)
    x = feeds["qkv"][0, :, (heads + kv_heads) * d:].reshape(seq, kv_heads, d).transpose(1, 0, 2)
    spread = x.max(-1, keepdims=True) - x.min(-1, keepdims=True)
    assert (np.abs(values[0, :, lengths[0] - seq:lengths[0]] - x) <= spread / 255 * 0.51 + 1e-3).all()


def test_int8_cache_bytes_do_not_depend_on_the_chunking() -> None:
    """A prompt written in one call, in two chunks, or a position at a time: the same cache bytes,
    so a prefix restored from a cache and one recomputed agree."""
    heads, kv_heads, d = 6, 2, 32
    feeds = _int8_case(1, 40, (40,), heads, kv_heads, d, seed=7)
    session = _attention_session(heads, kv_heads, d ** -0.5, kv_format="int8")
    whole = session.run(None, feeds)
    for cuts in ([0, 23, 40], list(range(41))):
        k, v = feeds["past_key"].copy(), feeds["past_value"].copy()
        for a, b in zip(cuts, cuts[1:], strict=False):
            part = {**feeds, "qkv": feeds["qkv"][:, a:b], "past_key": k, "past_value": v,
                    "seqlens_k": np.asarray([b - 1], np.int32)}
            _, k, v = session.run(None, part)
        assert np.array_equal(k, whole[1]) and np.array_equal(v, whole[2]), cuts


@pytest.mark.parametrize(("page", "seq", "lengths"), [(16, 1, (9, 1, 600)), (32, 37, (50,))])
def test_int8_paged_attention_equals_dense(page: int, seq: int, lengths: tuple[int, ...]) -> None:
    heads, kv_heads, d = 6, 2, 32
    per_row = -(-max(lengths) // page)
    feeds = _int8_case(len(lengths), seq, lengths, heads, kv_heads, d, cap=per_row * page, seed=page)
    rng = np.random.default_rng(page)
    needed = [-(-n // page) for n in lengths]
    order = rng.permutation(sum(needed) + 3)
    table = np.zeros((len(lengths), per_row), dtype=np.int32)
    pool_k = np.zeros((len(order), kv_heads, page, d + d // 4), np.uint8)
    pool_v = np.zeros_like(pool_k)
    at = 0
    for row, n in enumerate(needed):
        for i in range(n):
            table[row, i] = order[at]
            pool_k[order[at]] = feeds["past_key"][row, :, i * page:(i + 1) * page]
            pool_v[order[at]] = feeds["past_value"][row, :, i * page:(i + 1) * page]
            at += 1
    dense = _attention_session(heads, kv_heads, d ** -0.5, kv_format="int8").run(None, feeds)
    paged = _attention_session(heads, kv_heads, d ** -0.5, paged=True, kv_format="int8").run(
        None, {**feeds, "past_key": pool_k, "past_value": pool_v, "kv_pages": table})
    assert np.array_equal(paged[0], dense[0])
    for row, n in enumerate(lengths):
        gathered = np.concatenate([paged[1][table[row, i]] for i in range(needed[row])], axis=1)[:, :n]
        assert np.array_equal(gathered, dense[1][row, :, :n])


def test_int8_attention_refuses_what_it_cannot_read() -> None:
    with pytest.raises(Exception, match='kv_format must be "float16" or "int8"'):
        _attention_session(2, 1, 0.25, kv_format="int4").run(None, {})
    feeds = {"qkv": np.zeros((1, 1, 4 * 16), np.float32), "past_key": np.zeros((1, 1, 16, 16), np.uint8),
             "past_value": np.zeros((1, 1, 16, 16), np.uint8), "seqlens_k": np.asarray([3], np.int32),
             "cos": np.ones((32, 8), np.float32), "sin": np.zeros((32, 8), np.float32)}
    session = _attention_session(2, 1, 0.25, kv_format="int8")
    with pytest.raises(Exception, match=r"an int8 cache is .* D \+ D/4\] bytes"):
        session.run(None, feeds)  # rows of D bytes, not D + D/4
    feeds["past_key"] = feeds["past_value"] = np.zeros((1, 1, 16, 20), np.uint8)
    assert session.run(None, feeds)[0].shape == (1, 1, 32)
    fp16 = _attention_session(2, 1, 0.25, kv_format="int8", cache_type=TensorProto.FLOAT16)
    with pytest.raises(Exception, match="kv_format int8 takes uint8 caches"):
        fp16.run(None, {**feeds, "past_key": np.zeros((1, 1, 16, 16), np.float16),
                        "past_value": np.zeros((1, 1, 16, 16), np.float16)})
