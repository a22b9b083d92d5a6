"""The native Attention op for more architectures: head_dim up to 256, the `sliding_window` and
`softcap` attributes, any `scale`, on fp16 and int8 caches, on AVX-512 and AVX2.

Everything is checked against a float64 numpy attention written here from the definitions:
half-split ("NEOX") rope from the cos/sin caches, grouped-query heads, a causal mask narrowed
to keys p - window + 1 .. p (transformers' sliding_window_overlay for gemma2/gemma3, llama.cpp's
LLAMA_SWA_TYPE_STANDARD), scores = softcap * tanh(scale * q.k / softcap), softmax, the weighted
sum of values. Caches are pools of 16-position pages in a shuffled order, as PagedEngine keeps
them. Prefill chunks come after a cached prefix; decode steps run one token at a time over
rows of different lengths (past 256 keys a row's keys are split over several tasks).

The op never sees q/k norms (qwen3, gemma3): the graph applies them before it, and it takes q
and k as given, which is what every case here feeds it.
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

from tokenwire.server.engine import kv_int8
from tokenwire.server.native import loader as native_kernels

pytestmark = pytest.mark.cpu_flags("avx2", "fma", "f16c")

DOMAIN = "ai.tokenwire"
PAGE = 16
ISA_ENV = "TOKENWIRE_NATIVE_ISA"
SCALE = 144 ** -0.5  # gemma2-27b's query_pre_attn_scalar ** -0.5: not head_dim ** -0.5
CAP = 2.5  # small enough that the cap changes every softmax (gemma2 uses 50)
# (sliding_window, softcap): windows shorter than the prompt chunk (1 and 17: a tile boundary
# inside), a window longer than any row, with and without the cap.
VARIANTS = [(20, 0.0), (0, CAP), (1000, CAP), (1, 0.0)]
# (head_dim, query heads, KV heads): GQA ratios 1, 4 (gemma3-270m: 4 / 1 / 256) and 8.
SHAPES = [(d, h, g) for d in (64, 128, 256) for h, g in ((2, 2), (4, 1), (8, 1))]
# Each shape without either attribute, with both, and with one more variant (in turn).
CASES = [(*shape, *variant) for i, shape in enumerate(SHAPES)
         for variant in ((0, 0.0), (17, CAP), VARIANTS[i % len(VARIANTS)])]


def _session(heads: int, kv_heads: int, *, window: int | None = None, softcap: float | None = None,
             kv_format: str = "float16", scale: float = SCALE,
             shapes: dict[str, list[int]] | None = None) -> ort.InferenceSession:
    """The op alone over a paged cache; `shapes` declares inputs' shapes in the graph (else unknown)."""
    cache = TensorProto.UINT8 if kv_format == "int8" else TensorProto.FLOAT16
    specs = [("qkv", TensorProto.FLOAT), ("past_key", cache), ("past_value", cache), ("seqlens_k", TensorProto.INT32),
             ("cos", TensorProto.FLOAT), ("sin", TensorProto.FLOAT), ("kv_pages", TensorProto.INT32)]
    inputs = [helper.make_tensor_value_info(n, t, (shapes or {}).get(n)) for n, t in specs]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("present_key", cache, None),
               helper.make_tensor_value_info("present_value", cache, None)]
    attrs = {k: v for k, v in (("sliding_window", window), ("softcap", softcap)) if v is not None}
    node = helper.make_node("Attention", [i.name for i in inputs], [o.name for o in outputs], domain=DOMAIN,
                            num_heads=heads, kv_num_heads=kv_heads, scale=scale, kv_format=kv_format, **attrs)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(native_kernels.require()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _rope(d: int, positions: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    angles = np.outer(np.arange(positions), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Half-split rope: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in float64."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.astype(np.float64), sin.astype(np.float64)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: np.ndarray, scale: float,
            window: int, softcap: float) -> np.ndarray:
    """q [S, H, D] rotated; keys/values [G, >= last position + 1, D]: out [S, H * D], float64."""
    s, heads, d = q.shape
    group = heads // keys.shape[0]
    total = positions[-1] + 1
    j = np.arange(total)[None, :]
    p = positions[:, None]
    visible = (j <= p) & ((p - j < window) if window > 0 else True)
    out = np.zeros((s, heads, d))
    for h in range(heads):
        k, v = keys[h // group, :total], values[h // group, :total]
        scores = (q[:, h] @ k.T) * scale
        if softcap > 0:
            scores = softcap * np.tanh(scores / softcap)
        scores = np.where(visible, scores, -np.inf)
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (w / w.sum(axis=1, keepdims=True)) @ v
    return out.reshape(s, heads * d)


def _page_table(lengths: list[int], per_row: int, rng: np.random.Generator, spare: int = 3) -> np.ndarray:
    """Each row's pages, drawn in a shuffled order from one pool (with spare pages nobody holds)."""
    need = [-(-n // PAGE) for n in lengths]
    order = rng.permutation(sum(need) + spare).astype(np.int32)
    table = np.zeros((len(lengths), per_row), np.int32)
    at = 0
    for row, n in enumerate(need):
        table[row, :n] = order[at:at + n]
        at += n
    return table


def _to_pool(dense: np.ndarray, table: np.ndarray, lengths: list[int], pages: int) -> np.ndarray:
    """[B, G, cap, R] rows -> [pages, G, PAGE, R] pool laid out by the page table."""
    pool = np.zeros((pages, dense.shape[1], PAGE, dense.shape[3]), dense.dtype)
    for row, n in enumerate(lengths):
        for i in range(-(-n // PAGE)):
            pool[table[row, i]] = dense[row, :, i * PAGE:(i + 1) * PAGE]
    return pool


def _row(pool: np.ndarray, table: np.ndarray, row: int, n: int) -> np.ndarray:
    """Row `row`'s first n positions read back from the pool: [G, n, R]."""
    return np.concatenate([pool[table[row, i]] for i in range(-(-n // PAGE))], axis=1)[:, :n]


class Case:
    """A batch over a paged fp16 cache: random pasts of `pasts` positions, then calls of `seq` new
    tokens per row, each checked against the float64 reference (which keeps its own cache)."""

    def __init__(self, d: int, heads: int, kv_heads: int, pasts: list[int], grow: int, seed: int) -> None:
        self.d, self.heads, self.kv_heads = d, heads, kv_heads
        self.rng = np.random.default_rng(seed)
        self.lengths = list(pasts)
        self.cos, self.sin = _rope(d)
        longest = max(pasts) + grow
        self.per_row = -(-longest // PAGE)
        self.table = _page_table([n + grow for n in pasts], self.per_row, self.rng)
        pages = int(self.table.max()) + 4
        cap = self.per_row * PAGE
        dense_k = self.rng.standard_normal((len(pasts), kv_heads, cap, d)).astype(np.float16)
        dense_v = self.rng.standard_normal((len(pasts), kv_heads, cap, d)).astype(np.float16)
        self.key = _to_pool(dense_k, self.table, [n + grow for n in pasts], pages)
        self.value = _to_pool(dense_v, self.table, [n + grow for n in pasts], pages)
        self.ref_k, self.ref_v = dense_k.astype(np.float64), dense_v.astype(np.float64)

    def qkv(self, seq: int) -> np.ndarray:
        x = self.rng.standard_normal((len(self.lengths), seq, (self.heads + 2 * self.kv_heads) * self.d))
        x[..., :self.heads * self.d] *= 3  # sharper attention than random data gives
        return x.astype(np.float32)

    def feeds(self, qkv: np.ndarray) -> dict[str, np.ndarray]:
        seq = qkv.shape[1]
        return {"qkv": qkv, "past_key": self.key, "past_value": self.value,
                "seqlens_k": np.asarray([n + seq - 1 for n in self.lengths], np.int32), "cos": self.cos,
                "sin": self.sin, "kv_pages": self.table}

    def reference(self, qkv: np.ndarray, window: int, softcap: float, scale: float = SCALE) -> np.ndarray:
        """The expected output; the reference cache takes the new keys (rotated) and values in fp16."""
        h, g, d = self.heads, self.kv_heads, self.d
        seq = qkv.shape[1]
        out = np.zeros((len(self.lengths), seq, h * d))
        for row, past in enumerate(self.lengths):
            pos = np.arange(past, past + seq)
            x = qkv[row].astype(np.float64).reshape(seq, h + 2 * g, d)
            q = _rotate(x[:, :h], self.cos[pos][:, None], self.sin[pos][:, None])
            k = _rotate(x[:, h:h + g], self.cos[pos][:, None], self.sin[pos][:, None])
            self.ref_k[row][:, pos] = k.astype(np.float16).astype(np.float64).transpose(1, 0, 2)
            self.ref_v[row][:, pos] = x[:, h + g:].astype(np.float16).astype(np.float64).transpose(1, 0, 2)
            out[row] = _attend(q, self.ref_k[row], self.ref_v[row], pos, scale, window, softcap)
        return out

    def run(self, session: ort.InferenceSession, qkv: np.ndarray) -> np.ndarray:
        out, self.key, self.value = session.run(None, self.feeds(qkv))
        self.lengths = [n + qkv.shape[1] for n in self.lengths]
        return out


def _close(out: np.ndarray, ref: np.ndarray) -> None:
    err = np.abs(out - ref).max()
    assert err < 2e-4 * max(1.0, np.abs(ref).max()), f"max error {err:.3g}"


def _options(window: int, softcap: float) -> dict:
    """The attributes as a graph would write them: absent when off."""
    return {"window": window or None, "softcap": softcap or None}


@pytest.mark.parametrize(("d", "heads", "kv_heads", "window", "softcap"), CASES)
def test_prefill_after_a_cached_prefix_matches_reference(d: int, heads: int, kv_heads: int, window: int,
                                                         softcap: float) -> None:
    """A 40-token chunk (two query blocks) after 30 cached positions, and a first chunk, in one batch."""
    case = Case(d, heads, kv_heads, pasts=[30, 0], grow=40, seed=d + heads + window)
    session = _session(heads, kv_heads, **_options(window, softcap))
    qkv = case.qkv(40)
    ref = case.reference(qkv, window, softcap)
    _close(case.run(session, qkv), ref)
    for row, n in enumerate(case.lengths):  # the new keys (rotated) and values landed in the row's pages
        k, v = _row(case.key, case.table, row, n), _row(case.value, case.table, row, n)
        assert np.abs(k.astype(np.float64) - case.ref_k[row, :, :n]).max() < 2e-3 * np.abs(case.ref_k).max()
        assert np.array_equal(v.astype(np.float64), case.ref_v[row, :, :n])


@pytest.mark.parametrize(("d", "heads", "kv_heads", "window", "softcap"), CASES)
def test_decode_steps_match_reference(d: int, heads: int, kv_heads: int, window: int, softcap: float) -> None:
    """Rows of 1, 37 and 300 positions (several pages; two key chunks) decode three steps."""
    case = Case(d, heads, kv_heads, pasts=[1, 37, 300], grow=3, seed=d * heads + window)
    session = _session(heads, kv_heads, **_options(window, softcap))
    for _ in range(3):
        qkv = case.qkv(1)
        ref = case.reference(qkv, window, softcap)
        _close(case.run(session, qkv), ref)


@pytest.mark.parametrize(("d", "heads", "kv_heads", "window", "softcap"),
                         [(64, 9, 3, 0, 0.0), (64, 9, 3, 100, CAP), (256, 4, 1, 512, 50.0), (256, 8, 1, 33, 0.0)])
def test_a_row_decodes_the_same_alone_or_in_a_batch(d: int, heads: int, kv_heads: int, window: int,
                                                    softcap: float) -> None:
    """Bit for bit: a row's key chunks start where its own window does, whatever the batch."""
    lengths = [300, 17, 1000, 600]
    case = Case(d, heads, kv_heads, pasts=lengths, grow=1, seed=7)
    session = _session(heads, kv_heads, **_options(window, softcap))
    qkv = case.qkv(1)
    batched = session.run(None, case.feeds(qkv))[0]
    for row, n in enumerate(lengths):
        alone = session.run(None, {**case.feeds(qkv[row:row + 1]), "seqlens_k": np.asarray([n], np.int32),
                                   "kv_pages": case.table[row:row + 1]})[0]
        assert np.array_equal(alone[0], batched[row]), f"row {row} ({n} positions) differs"
    _close(batched, case.reference(qkv, window, softcap))


@pytest.mark.parametrize(("d", "seq"), [(64, 1), (256, 1), (128, 40)])
def test_keys_and_values_outside_the_window_are_never_read(d: int, seq: int) -> None:
    """Every position before the first query's window holds NaN in the pool: a value read there
    (even with weight 0) would make the output NaN."""
    window = 20
    case = Case(d, 4, 2, pasts=[300, 1000, 5], grow=seq, seed=11)
    for row, past in enumerate(case.lengths):
        for p in range(max(0, past - window + 1)):
            page, at = case.table[row, p // PAGE], p % PAGE
            case.key[page, :, at] = case.value[page, :, at] = np.nan
    qkv = case.qkv(seq)
    ref = case.reference(qkv, window, CAP)  # from its own cache, which holds no NaN
    _close(case.run(_session(4, 2, window=window, softcap=CAP), qkv), ref)


def test_any_scale() -> None:
    """`scale` multiplies q.k whatever it is: 1, a large one, a negative one (the op adds no head_dim**-0.5)."""
    for scale in (1.0, 0.7, -0.05):
        case = Case(64, 4, 2, pasts=[40, 5], grow=1, seed=3)
        qkv = case.qkv(1) / 4  # scale 1 over head_dim 64 would be one-hot otherwise
        ref = case.reference(qkv, 0, 0.0, scale)
        _close(case.run(_session(4, 2, scale=scale), qkv), ref)


@pytest.mark.parametrize(("d", "window", "softcap"), [(64, 20, CAP), (256, 17, 0.0), (256, 0, CAP), (128, 1000, 0.0)])
def test_int8_cache_with_window_and_softcap(d: int, window: int, softcap: float) -> None:
    """The int8 cache (kv_format "int8") takes the same attributes and head sizes: row 1 prefills
    20 tokens alone, then both rows a 40-token chunk, then two decode steps; each call against
    the reference over the cache as the op wrote it (dequantized by engine/kv_int8.py), and the
    new positions' keys and values within a rounding step of what they were."""
    heads, kv_heads = 8, 2
    calls = [([1], 20), ([0, 1], 40), ([0, 1], 1), ([0, 1], 1)]
    rng = np.random.default_rng(d + window)
    cos, sin = _rope(d)
    table = _page_table([42, 62], -(-62 // PAGE), rng)
    key = np.zeros((int(table.max()) + 2, kv_heads, PAGE, kv_int8.row_bytes(d)), np.uint8)
    value = key.copy()
    session = _session(heads, kv_heads, kv_format="int8", **_options(window, softcap))
    lengths = [0, 0]
    for rows, seq in calls:
        qkv = rng.standard_normal((len(rows), seq, (heads + 2 * kv_heads) * d)).astype(np.float32)
        qkv[..., :heads * d] *= 3
        seqlens = np.asarray([lengths[r] + seq - 1 for r in rows], np.int32)
        out, key, value = session.run(None, {"qkv": qkv, "past_key": key, "past_value": value, "seqlens_k": seqlens,
                                             "cos": cos, "sin": sin, "kv_pages": table[rows]})
        for i, r in enumerate(rows):
            total = lengths[r] + seq
            pos = np.arange(lengths[r], total)
            x = qkv[i].astype(np.float64).reshape(seq, heads + 2 * kv_heads, d)
            q = _rotate(x[:, :heads], cos[pos][:, None], sin[pos][:, None])
            keys = kv_int8.dequantize_keys(_row(key, table, r, -(-total // PAGE) * PAGE), total, d)  # whole blocks
            values = kv_int8.dequantize_values(_row(value, table, r, total), d)
            k_new = _rotate(x[:, heads:heads + kv_heads], cos[pos][:, None], sin[pos][:, None]).transpose(1, 0, 2)
            v_new = x[:, heads + kv_heads:].transpose(1, 0, 2)
            assert np.abs(keys[:, pos] - k_new).max() <= 1.5 * np.ptp(keys) / 255
            assert np.abs(values[:, pos] - v_new).max() <= np.ptp(v_new) / 255
            _close(out[i], _attend(q, keys, values, pos, SCALE, window, softcap))
            lengths[r] = total


def _declared(d: int, heads: int, kv_heads: int, row: int | None = None) -> dict[str, list[int]]:
    return {"qkv": [1, 1, (heads + 2 * kv_heads) * d], "past_key": [4, kv_heads, PAGE, row or d],
            "past_value": [4, kv_heads, PAGE, row or d]}


def test_bad_attributes_are_refused_when_the_session_is_created() -> None:
    with pytest.raises(Exception, match="sliding_window must be 0 .none. or a positive"):
        _session(4, 1, window=-1)
    for cap in (-1.0, float("nan"), float("inf")):
        with pytest.raises(Exception, match="softcap must be 0 .none. or a positive finite"):
            _session(4, 1, softcap=cap)
    for d in (272, 8, 40):
        with pytest.raises(Exception, match=rf"head size must be a multiple of 16, at most 256 .* give {d}\)"):
            _session(4, 1, shapes=_declared(d, 4, 1))
        with pytest.raises(Exception, match=rf"at most 256 .* give {d}\)"):  # only the caches declared
            _session(4, 1, shapes={"past_key": [4, 1, PAGE, d]})
    with pytest.raises(Exception, match=r"at most 256 .* give 272\)"):  # int8 rows of D + D/4 bytes
        _session(4, 1, kv_format="int8", shapes={"past_key": [4, 1, PAGE, kv_int8.row_bytes(272)]})
    _session(4, 1, window=512, softcap=50.0, shapes=_declared(256, 4, 1))
    _session(4, 1, kv_format="int8", shapes=_declared(256, 4, 1, kv_int8.row_bytes(256)))


def test_a_bad_head_size_the_graph_does_not_declare_fails_at_run() -> None:
    d = 272
    session = _session(4, 1)
    feeds = {"qkv": np.zeros((1, 1, 6 * d), np.float32), "past_key": np.zeros((1, 1, PAGE, d), np.float16),
             "past_value": np.zeros((1, 1, PAGE, d), np.float16), "seqlens_k": np.asarray([0], np.int32),
             "cos": np.ones((4, d // 2), np.float32), "sin": np.zeros((4, d // 2), np.float32),
             "kv_pages": np.zeros((1, 1), np.int32)}
    with pytest.raises(Exception, match="head size must be a multiple of 16, at most 256"):
        session.run(None, feeds)


def _cpu_has_avx512() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"))


def test_the_avx2_kernels_pass_this_file() -> None:
    """This process runs AVX-512 where the CPU has it; the AVX2 kernels (chosen once per process)
    run this file again in a child forced onto them. On a CPU without AVX-512 this process
    already is that run."""
    if os.environ.get(ISA_ENV) == "avx2" or native_kernels.library().isa == "avx2":
        assert os.environ.get(ISA_ENV) == "avx2" or not _cpu_has_avx512()
        return
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_kernels_pass"],
        env={**os.environ, ISA_ENV: "avx2"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
