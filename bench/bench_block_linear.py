"""µs per call of the native BlockLinear op (GGUF blocks, server/build/gguf_pack.py) against
today's Linear Q4_1 on the same shapes, at the decode batch sizes (rows 1 and 8).

Each op runs alone in an onnxruntime session (intra-op threads: --threads), on random weights of the
type's layout. --rounds rounds of --calls timed calls go over every op in turn (a shared machine's
noise hits them alike); the figures are the fastest call (what a quiet core gives: on a shared
machine a median mostly measures the neighbours) and the lowest round median. They include
onnxruntime's per-call overhead (~5 µs, the same for every row). Table on stdout, JSON in
bench/results/block_linear_<isa>_t<threads>.json. Shapes: qwen2-0.5B's ffn up (K=896, N=4864) and down (K=4864,
N=896), qwen2-1.5B's ffn up (K=1536, N=8960); a type whose block does not divide K is left out
(K-quants need K a multiple of 256, as in llama.cpp, which writes such tensors as Q5_0 / Q8_0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_json  # noqa: E402

from tokenwire.server.build import gguf_pack  # noqa: E402
from tokenwire.server.build.native_pack import NativeEmitter  # noqa: E402
from tokenwire.server.native import loader  # noqa: E402

SHAPES = {"0.5B ffn up": (896, 4864), "0.5B ffn down": (4864, 896), "1.5B ffn up": (1536, 8960)}
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16]
# Where each type's fp16 fields sit in its block (set to a sane value; codes stay random bytes).
FP16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q5_0: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2), T.Q4_K: (0, 2),
               T.Q5_K: (0, 2), T.Q6_K: (208,)}


def gguf_tensor(qtype: T, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.F16:
        return rng.standard_normal((n, k)).astype(np.float16)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        raw[..., at:at + 2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return raw.reshape(n, -1)


def _session(nodes: list, inits: list, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(gguf_pack.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(loader.require()))
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def block_session(qtype: T, k: int, n: int, threads: int, rng: np.random.Generator) -> tuple[ort.InferenceSession, int]:
    p = gguf_pack.pack(qtype, gguf_tensor(qtype, k, n, rng), k, n)
    node = helper.make_node("BlockLinear", ["x", "codes", "meta"], ["y"], domain=gguf_pack.DOMAIN,
                            qtype=int(qtype), K=k, N=n)
    inits = [numpy_helper.from_array(p.codes, "codes"), numpy_helper.from_array(p.meta, "meta")]
    return _session([node], inits, threads), gguf_pack.packed_nbytes(p)


def linear_q4_1_session(k: int, n: int, threads: int, rng: np.random.Generator) -> tuple[ort.InferenceSession, int]:
    em = NativeEmitter()
    em.linear("x", rng.standard_normal((k, n)).astype(np.float32), "y", "w", 4, 0)
    return _session(em.nodes, em.inits, threads), sum(len(t.raw_data) for t in em.inits)


def time_calls(session: ort.InferenceSession, x: np.ndarray, calls: int) -> tuple[float, float]:
    """(fastest, median) µs of `calls` calls."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6, median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=20, help="rounds over all ops in turn")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results, rows_out = [], []
    for shape in args.shapes:
        k, n = SHAPES[shape]
        ops = {"Linear Q4_1": linear_q4_1_session(k, n, args.threads, rng)}
        ops.update({f"BlockLinear {t.name}": block_session(t, k, n, args.threads, rng) for t in TYPES
                    if k % GGML_QUANT_SIZES[t][0] == 0})
        best: dict[tuple[str, int], float] = {}  # the fastest call: what a quiet machine gives
        typical: dict[tuple[str, int], float] = {}  # the lowest round median
        for rows in (1, 8):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            for session, _ in ops.values():
                time_calls(session, x, 5)  # warm-up
            # Rounds over every op in turn, so that a noisy moment (a shared machine) hits them alike.
            for _ in range(args.rounds):
                for label, (session, _) in ops.items():
                    fastest, med = time_calls(session, x, args.calls)
                    best[label, rows] = min(best.get((label, rows), fastest), fastest)
                    typical[label, rows] = min(typical.get((label, rows), med), med)
        for label, (_, nbytes) in ops.items():
            row = {"shape": shape, "K": k, "N": n, "op": label, "weight_mb": nbytes / 1e6}
            for rows in (1, 8):
                row[f"us_rows{rows}"] = best[label, rows]
                row[f"median_us_rows{rows}"] = typical[label, rows]
                row[f"vs_q4_1_rows{rows}"] = best[label, rows] / best["Linear Q4_1", rows]
            results.append(row)
            rows_out.append([shape, label, row["weight_mb"], row["us_rows1"], row["vs_q4_1_rows1"],
                             row["median_us_rows1"], row["us_rows8"], row["vs_q4_1_rows8"], row["median_us_rows8"]])
    isa = loader.library().isa
    print(f"isa {isa}, {args.threads} intra-op threads, {args.rounds} rounds of {args.calls} calls: the fastest call "
          "(x Q4_1: against Linear Q4_1's) and the lowest round median")
    print(table(["shape", "op", "weights MB", "µs rows=1", "x Q4_1", "median", "µs rows=8", "x Q4_1", "median"],
                rows_out))
    path = write_json(f"block_linear_{isa}_t{args.threads}.json", {
        "isa": isa, "threads": args.threads, "calls": args.calls, "rounds": args.rounds, "rows": results})
    print(f"written {path}")


if __name__ == "__main__":
    main()
