"""Weight-only quantization of an ONNX decoder graph into `MatMulNBits` (com.microsoft).

Two routes, chosen per weight:

* **Carried-over GGUF blocks** (lossless). When a weight lies exactly on a llama.cpp
  Q4_1 grid (blocks of 32 along K, x = q·d + m) or Q8_0 grid (x = q·d) — as every weight
  of a model converted from such a GGUF does — the codes and scales are recovered
  exactly. Q4_1's float minimum `m` cannot live in MatMulNBits' uint8 zero point, so
  the codes go in with zero point 0 and the minimum becomes a correction added to the
  output: blocksum(A) @ M, with blocksum(A) = A @ E (E: [K, K/32] block indicator),
  shared between the linears that read the same input. Q8_0 maps exactly onto
  bits=8 with codes+128 and zero point 128.
* **Re-quantization** (lossy) of any other fp32 weight: asymmetric blocks of 32 with a
  uint8 zero point, the layout of onnxruntime's MatMulNBitsQuantizer.

See DESIGN.md ("int4 without loss") for the measurements behind this choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass
class QuantizedWeight:
    bits: int
    codes: np.ndarray  # uint8 [N, K/32, 32*bits/8], packed as MatMulNBits wants
    scales: np.ndarray  # float32 [N * K/32]
    zero_points: np.ndarray  # uint8, packed
    mins: np.ndarray | None  # float32 [K/32, N]: Q4_1 minimum, added as a correction
    max_abs_error: float
    route: str  # "q4_1", "q8_0", "asym4", "asym8"


def _pack4(codes: np.ndarray) -> np.ndarray:
    """Packs uint8 values < 16 two per byte along the last axis, low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _blocks(weight_kn: np.ndarray) -> np.ndarray:
    """[K, N] weight (x @ W layout) -> [N, K/32, 32] blocks along K."""
    k, n = weight_kn.shape
    return np.ascontiguousarray(weight_kn.T).reshape(n, k // BLOCK, BLOCK).astype(np.float64)


def _zero_points(n: int, kb: int, bits: int, value: int) -> np.ndarray:
    if bits == 8:
        return np.full((n * kb,), value, dtype=np.uint8)
    per_row = (kb + 1) // 2
    zp = np.full((n, per_row * 2), value, dtype=np.uint8)
    return _pack4(zp).reshape(-1)


def try_q4_1(weight_kn: np.ndarray, tolerance: float = 1e-6) -> QuantizedWeight | None:
    """Recovers llama.cpp Q4_1 blocks (min at code 0, max at code 15) if the weight lies on them."""
    b = _blocks(weight_kn)
    lo = b.min(axis=-1, keepdims=True)
    hi = b.max(axis=-1, keepdims=True)
    d = (hi - lo) / 15.0
    safe_d = np.where(d == 0, 1.0, d)
    q = np.clip(np.rint((b - lo) / safe_d), 0, 15)
    err = float(np.abs(q * d + lo - b).max())
    if err > tolerance * max(float(np.abs(b).max()), 1e-12):
        return None
    n, kb, _ = b.shape
    codes = _pack4(q.astype(np.uint8))  # [N, kb, 16]
    return QuantizedWeight(
        bits=4,
        codes=codes,
        scales=d.reshape(-1).astype(np.float32),
        zero_points=_zero_points(n, kb, 4, 0),
        mins=np.ascontiguousarray(lo[..., 0].T).astype(np.float32),  # [kb, N]
        max_abs_error=err,
        route="q4_1",
    )


def try_q8_0(weight_kn: np.ndarray, tolerance: float = 1e-6) -> QuantizedWeight | None:
    """Recovers llama.cpp Q8_0 blocks (x = q·d, d = amax/127) if the weight lies on them."""
    b = _blocks(weight_kn)
    d = np.abs(b).max(axis=-1, keepdims=True) / 127.0
    safe_d = np.where(d == 0, 1.0, d)
    q = np.clip(np.rint(b / safe_d), -127, 127)
    err = float(np.abs(q * d - b).max())
    if err > tolerance * max(float(np.abs(b).max()), 1e-12):
        return None
    n, kb, _ = b.shape
    return QuantizedWeight(
        bits=8,
        codes=(q + 128).astype(np.uint8),
        scales=d.reshape(-1).astype(np.float32),
        zero_points=_zero_points(n, kb, 8, 128),
        mins=None,
        max_abs_error=err,
        route="q8_0",
    )


def quantize_asym(weight_kn: np.ndarray, bits: int) -> QuantizedWeight:
    """Plain asymmetric block quantization (uint8 zero point), for weights not on a GGUF grid."""
    b = _blocks(weight_kn)
    levels = (1 << bits) - 1
    lo = np.minimum(b.min(axis=-1, keepdims=True), 0.0)
    hi = np.maximum(b.max(axis=-1, keepdims=True), 0.0)
    d = (hi - lo) / levels
    safe_d = np.where(d == 0, 1.0, d)
    zp = np.clip(np.rint(-lo / safe_d), 0, levels)
    q = np.clip(np.rint(b / safe_d) + zp, 0, levels)
    err = float(np.abs((q - zp) * d - b).max())
    n, kb, _ = b.shape
    zp_u8 = zp[..., 0].astype(np.uint8)  # [N, kb]
    if bits == 4:
        codes = _pack4(q.astype(np.uint8))
        padded = np.zeros((n, ((kb + 1) // 2) * 2), dtype=np.uint8)
        padded[:, :kb] = zp_u8
        zero_points = _pack4(padded).reshape(-1)
    else:
        codes = q.astype(np.uint8)
        zero_points = zp_u8.reshape(-1)
    return QuantizedWeight(
        bits=bits,
        codes=codes,
        scales=d.reshape(-1).astype(np.float32),
        zero_points=zero_points,
        mins=None,
        max_abs_error=err,
        route=f"asym{bits}",
    )


def quantize_weight(weight_kn: np.ndarray, bits: int, *, lm_head: bool) -> QuantizedWeight:
    """Lossless GGUF carry-over when the weight allows it, else re-quantization."""
    if lm_head:
        found = try_q8_0(weight_kn)
        if found is not None:
            return found
        return quantize_asym(weight_kn, 8)
    if bits == 4:
        found = try_q4_1(weight_kn)
        if found is not None:
            return found
    return quantize_asym(weight_kn, bits)


class NBitsEmitter:
    """Emits `y = x @ W` as MatMulNBits nodes (plus the Q4_1 minimum correction when needed).

    Block sums of an input are computed once and shared by every linear reading it. With
    `two_d=True` (every input is [rows, K]) the correction and its addition are one `Gemm`
    (C = the MatMulNBits output) instead of a MatMul and an Add: one node fewer per linear,
    which matters when a decode step is hundreds of small kernels.
    """

    def __init__(self, two_d: bool = False) -> None:
        self.two_d = two_d
        self.nodes: list = []
        self.inits: list = []
        self.routes: dict[str, int] = {}
        self._block_sums: dict[str, str] = {}
        self._init_names: set[str] = set()

    def _init(self, array: np.ndarray, name: str) -> None:
        from onnx import numpy_helper

        if name not in self._init_names:
            self._init_names.add(name)
            self.inits.append(numpy_helper.from_array(array, name))

    def linear(self, x: str, w: np.ndarray, out: str, base: str, bits: int, level: int, lm_head: bool = False) -> str:
        from onnx import helper

        k, n = w.shape
        q = quantize_weight(w, bits, lm_head=lm_head)
        self.routes[q.route] = self.routes.get(q.route, 0) + 1
        kb = k // BLOCK
        self._init(q.codes.reshape(n, kb, -1), base + "_q")
        self._init(q.scales, base + "_scales")
        self._init(q.zero_points, base + "_zp")
        main_out = out if q.mins is None else out + "_nbits"
        self.nodes.append(helper.make_node(
            "MatMulNBits", [x, base + "_q", base + "_scales", base + "_zp"], [main_out], name=base + "_nbits",
            domain="com.microsoft", K=k, N=n, bits=q.bits, block_size=BLOCK, accuracy_level=level,
        ))
        if q.mins is not None:
            if x not in self._block_sums:
                ind_name = f"block_indicator_{k}"
                self._init(np.kron(np.eye(kb, dtype=np.float32), np.ones((BLOCK, 1), dtype=np.float32)), ind_name)
                sums = x.replace("/", "_") + "_blocksums"
                self.nodes.append(helper.make_node("MatMul", [x, ind_name], [sums], name=sums + "_mm"))
                self._block_sums[x] = sums
            self._init(q.mins, base + "_mins")
            if self.two_d:
                self.nodes.append(helper.make_node(
                    "Gemm", [self._block_sums[x], base + "_mins", main_out], [out], name=base + "_mincorr"))
            else:
                corr = base + "_mincorr"
                self.nodes.append(helper.make_node("MatMul", [self._block_sums[x], base + "_mins"], [corr], name=corr))
                self.nodes.append(helper.make_node("Add", [main_out, corr], [out], name=base + "_addmin"))
        return out


def quantize_graph(
    model,  # onnx.ModelProto, loaded with its external data
    bits: int = 4,
    accuracy_level: int = 0,
    lm_head_accuracy_level: int = 4,
    level_for: Callable[[str], int | None] | None = None,
) -> dict[str, int]:
    """Rewrites every MatMul by a 2-D float initializer into MatMulNBits, in place.

    Returns how many weights took each route. The lm_head (the MatMul that produces
    `logits`) is kept at 8 bits: it is the largest single weight and its errors reach every
    token's probability directly.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    output_names = {o.name for o in graph.output}

    # A tied lm_head is exported as Transpose(embedding) feeding the last MatMul.
    transposed: dict[str, str] = {}
    for node in graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type == "Transpose" and node.input[0] in inits and perm in ([], [[1, 0]]):
            transposed[node.output[0]] = node.input[0]

    new_nodes = []
    emitter = NBitsEmitter()
    removed: set[str] = set()

    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        init = inits.get(weight_name) or inits.get(transposed.get(weight_name, ""))
        if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(init)
        if weight_name in transposed:
            w = w.T
        if w.shape[0] % BLOCK:
            new_nodes.append(node)
            continue
        is_head = any(out in output_names for out in node.output)
        level = lm_head_accuracy_level if is_head else accuracy_level
        if level_for is not None and not is_head:
            override = level_for(node.name)
            level = accuracy_level if override is None else override
        start = len(emitter.nodes)
        base = weight_name.replace("/", "_").replace(":", "_")
        emitter.linear(node.input[0], w, node.output[0], base, bits, level, lm_head=is_head)
        new_nodes.extend(emitter.nodes[start:])
        consumers[weight_name] -= 1
        if consumers[weight_name] == 0:
            removed.add(weight_name)
    new_inits = emitter.inits
    routes = emitter.routes

    still_used = {name for node in new_nodes for name in node.input}
    new_nodes = [
        node for node in new_nodes
        if not (node.op_type == "Transpose" and node.output[0] in transposed and node.output[0] not in still_used)
    ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [i for i in graph.initializer if i.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return routes
