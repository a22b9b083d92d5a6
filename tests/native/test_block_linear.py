"""The native BlockLinear / BlockGather ops on GGUF blocks (server/build/gguf_pack.py,
server/native/tw_blocks*.c): packing exact bit for bit, the ops in a real onnxruntime session
against an independent float64 reference (gguf's own numpy dequantization), on AVX-512 and AVX2.

Quantized types round x to int16 per block of 32 (relative error ~3e-5 of the output's scale);
float types compute in fp32 (~1e-6). Every row is computed alike whatever the number of rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from onnx import TensorProto, helper, numpy_helper

from tokenwire.server.build import gguf_pack
from tokenwire.server.native import loader as native_kernels

pytestmark = pytest.mark.cpu_flags("avx2", "fma", "f16c")

TYPES = [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_1, T.Q5_K, T.BF16]
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}  # gguf.quants.quantize writes these
FLOATS = {T.F32, T.F16, T.BF16}
ISA_ENV = "TOKENWIRE_NATIVE_ISA"


def _fp16_field(rng: np.random.Generator, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    """Sane fp16 scales as bytes [..., 2]: 1e-4 .. 1e-2, random sign when signed."""
    v = rng.random(shape) * 0.01 + 1e-4
    if signed:
        v *= rng.choice([-1.0, 1.0], shape)
    return v.astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_tensor(qtype: int, k: int, n: int, rng: np.random.Generator, source: str = "random") -> np.ndarray:
    """A GGUF tensor's data as GGUFReader gives it: float32 / float16 [n, k], else uint8 [n, row_bytes].
    source "random": random bytes for codes and sub-scales, sane fp16 d / m / dmin; "quantize": gguf's
    own quantizer applied to a random weight (types it can write)."""
    qtype = T(qtype)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if qtype == T.F32:
        return w
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype == T.BF16 or source == "quantize":
        w[:, :8] *= 20  # an outlier block
        return gguf.quants.quantize(w, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    nb = (n, k // block)
    fields = {T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0], T.Q4_1: [0, 2], T.Q5_1: [0, 2], T.Q4_K: [0, 2],
              T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for i, at in enumerate(fields):
        raw[..., at:at + 2] = _fp16_field(rng, nb, signed=i == 0 and qtype not in (T.Q4_K, T.Q5_K))
    return raw.reshape(n, -1)


def reference(qtype: int, raw: np.ndarray, k: int, n: int) -> np.ndarray:
    """gguf's dequantization: float32 [n, k] (row n = output column n)."""
    return gguf.quants.dequantize(raw, T(qtype)).reshape(n, k)


def _session(p: gguf_pack.PackedBlocks, op: str, **attrs) -> ort.InferenceSession:
    first = TensorProto.FLOAT if op == "BlockLinear" else TensorProto.INT64
    node = helper.make_node(op, ["x", "codes", "meta"], ["y"], domain=gguf_pack.DOMAIN,
                            **{"qtype": p.qtype, "K": p.k, "N": p.n, **attrs})
    graph = helper.make_graph(
        [node], "block", [helper.make_tensor_value_info("x", first, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(p.codes, "codes"), numpy_helper.from_array(p.meta, "meta")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(gguf_pack.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(native_kernels.require()))
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _shape(qtype: int) -> tuple[int, int]:
    """K, N: two K-quant super-blocks; float types with K not a multiple of 16 (the kernels' tails);
    N never a multiple of the 16-column tile (padding must not leak)."""
    return (204, 40) if qtype in FLOATS else (512, 40)


def check_op(qtype: int, source: str) -> None:
    """BlockLinear against x @ W in float64 for 1, 3 and 17 rows (17: more than one quantize
    chunk), a batch row against itself alone, and BlockGather against the dequantized rows."""
    rng = np.random.default_rng([int(qtype), len(source)])
    k, n = _shape(qtype)
    raw = random_tensor(qtype, k, n, rng, source)
    w = reference(qtype, raw, k, n)
    p = gguf_pack.pack(qtype, raw, k, n)
    linear = _session(p, "BlockLinear")
    tol = 2e-6 if qtype in FLOATS else 1e-4
    batch = None
    for rows in (1, 3, 17):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[:, 32:64] *= 40  # a block with larger values: its own activation scale
        y = linear.run(None, {"x": x})[0]
        assert y.shape == (rows, n)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < tol, f"{T(qtype).name} rows={rows}: relative error {err:.2e}"
        batch = (x, y)
    x, y = batch
    for row in (0, 7, 16):
        assert np.array_equal(linear.run(None, {"x": x[row:row + 1]})[0][0], y[row])
    x3 = x[:6].reshape(2, 3, k)  # any leading shape
    assert np.array_equal(linear.run(None, {"x": x3})[0], y[:6].reshape(2, 3, n))
    ids = rng.integers(0, n, (3, 5))
    ids[0, :2] = [0, n - 1]
    got = _session(p, "BlockGather").run(None, {"x": ids})[0]
    assert got.shape == (3, 5, k) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), w[ids].view(np.uint32)), "BlockGather differs from gguf's rows"


CASES = [(t, "random") for t in TYPES] + [(t, "quantize") for t in TYPES if t in QUANTIZABLE]


@pytest.mark.parametrize(("qtype", "source"), CASES, ids=[f"{t.name}-{s}" for t, s in CASES])
def test_block_ops_match_gguf(qtype: int, source: str) -> None:
    check_op(qtype, source)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_packing_is_exact_and_small(qtype: int, monkeypatch) -> None:
    rng = np.random.default_rng(int(qtype) + 100)
    k, n = (1024, 250) if qtype not in FLOATS else (96, 250)  # N padded 250 -> 256: it counts
    raw = random_tensor(qtype, k, n, rng)
    whole = gguf_pack.pack(qtype, raw, k, n)
    monkeypatch.setattr(gguf_pack, "_SLICE_WEIGHTS", 3 * 16 * k)  # slices of 3 tiles, the last one short
    p = gguf_pack.pack(qtype, raw, k, n)
    assert np.array_equal(p.codes, whole.codes) and np.array_equal(p.meta, whole.meta)
    exact = reference(qtype, raw, k, n).T.astype(np.float64)
    got = gguf_pack.dequantize_packed(p)
    assert got.shape == (k, n) and np.array_equal(got, exact)
    assert (p.codes.size, p.meta.size) == gguf_pack.sizes(qtype, k, n)
    file_bytes = gguf_pack.file_nbytes(qtype, k, n)
    assert file_bytes == raw.nbytes
    assert gguf_pack.packed_nbytes(p) <= 1.15 * file_bytes


def test_pack_takes_the_reader_layouts_and_refuses_bad_input() -> None:
    rng = np.random.default_rng(5)
    raw = random_tensor(T.Q4_K, 256, 16, rng)
    flat = gguf_pack.pack(T.Q4_K, raw.reshape(-1), 256, 16)  # any array of the tensor's bytes
    assert np.array_equal(flat.codes, gguf_pack.pack(T.Q4_K, raw, 256, 16).codes)
    with pytest.raises(ValueError, match="Q4_K needs K a multiple of 256"):
        gguf_pack.pack(T.Q4_K, raw, 128, 32)
    with pytest.raises(ValueError, match="Q8_0 needs K a multiple of 32"):
        gguf_pack.pack(T.Q8_0, np.zeros((4, 34), np.uint8), 48, 4)
    with pytest.raises(ValueError, match="needs 2304 bytes"):
        gguf_pack.pack(T.Q4_K, raw[:15], 256, 16)
    for qtype in (T.Q2_K, T.Q3_K, T.IQ4_NL):
        with pytest.raises(ValueError, match=f"{qtype.name} is not supported"):
            gguf_pack.pack(qtype, np.zeros(1024, np.uint8), 256, 4)
    message = gguf_pack.unsupported_message(T.Q2_K, "blk.0.ffn_down.weight")
    assert message.startswith("Q2_K is not supported (tensor blk.0.ffn_down.weight); supported: ")
    assert all(t.name in message for t in TYPES)
    assert gguf_pack.SUPPORTED == frozenset(int(t) for t in TYPES)


def test_ops_refuse_bad_attributes_and_sizes() -> None:
    rng = np.random.default_rng(6)
    p = gguf_pack.pack(T.Q8_0, random_tensor(T.Q8_0, 64, 20, rng), 64, 20)
    with pytest.raises(Exception, match="qtype 10 is not one it computes"):
        _session(p, "BlockLinear", qtype=int(T.Q2_K))
    with pytest.raises(Exception, match=r"K \(48\) must be a positive multiple of the type's block \(32\)"):
        _session(p, "BlockLinear", K=48)
    session = _session(p, "BlockLinear")
    with pytest.raises(Exception, match="not K"):
        session.run(None, {"x": np.ones((1, 96), np.float32)})
    with pytest.raises(Exception, match="packed sizes"):
        _session(p, "BlockLinear", N=40).run(None, {"x": np.ones((1, 64), np.float32)})
    assert session.run(None, {"x": np.ones((0, 64), np.float32)})[0].shape == (0, 20)
    gather = _session(p, "BlockGather")
    with pytest.raises(Exception, match=r"outside \[0, N\)"):
        gather.run(None, {"x": np.array([3, 20])})
    with pytest.raises(Exception, match=r"outside \[0, N\)"):
        gather.run(None, {"x": np.array([-1])})
    assert gather.run(None, {"x": np.array([[19]])})[0].shape == (1, 1, 64)


def _cpu_has_avx512() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"))


def test_the_other_instruction_set_agrees() -> None:
    """This process runs AVX-512 where the CPU has it; the AVX2 kernels (the choice is made once per
    process) run every case of check_op in a child process forced onto them. On a CPU without
    AVX-512 this process already is that run."""
    if os.environ.get(ISA_ENV) == "avx2" or native_kernels.library().isa == "avx2":
        assert os.environ.get(ISA_ENV) == "avx2" or not _cpu_has_avx512()
        return
    done = subprocess.run([sys.executable, __file__], env={**os.environ, ISA_ENV: "avx2"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.split() == ["avx2", f"{len(CASES)}", "cases", "passed"]


if __name__ == "__main__":  # the child of test_the_other_instruction_set_agrees
    print(native_kernels.library().isa, end=" ")
    for case in CASES:
        check_op(*case)
    print(len(CASES), "cases passed")
