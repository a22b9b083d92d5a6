"""The native Attention op alone at decode: microseconds per call, one new token per row over a
paged fp16 (or int8) cache, the caches bound in place as the engine binds them (IO binding, past
and present the same OrtValue), so a call reads the cache and writes one position, nothing else.

Shapes: smollm2 (9 query heads, 3 KV heads, head_dim 64), qwen-128 (16/8/128), gemma3-270m
(4/1/256) and gemma3-swa (the same with a 512-position sliding window and a softcap). Each ISA
runs in a child process (the kernels' instruction set is chosen once per process).
`--clock cpu` times the calling thread's CPU time (with `--threads 1` onnxruntime computes on the
calling thread), which leaves out waiting for a core on a machine others are loading.
`--library` times another build of the kernels (e.g. one compiled from an older checkout, to
measure a change before and after).

    .venv/bin/python bench/bench_attention_op.py [--isa both] [--contexts 256,2048] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json  # noqa: E402

PAGE = 16
# name: (query heads, KV heads, head_dim, extra attributes)
SHAPES: dict[str, tuple[int, int, int, dict]] = {
    "smollm2": (9, 3, 64, {}),
    "qwen-128": (16, 8, 128, {}),
    "gemma3": (4, 1, 256, {}),
    "gemma3-swa": (4, 1, 256, {"sliding_window": 512, "softcap": 50.0}),
}


def _session(library: str, heads: int, kv_heads: int, d: int, kv_format: str, attrs: dict, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    cache = TensorProto.UINT8 if kv_format == "int8" else TensorProto.FLOAT16
    specs = [("qkv", TensorProto.FLOAT), ("past_key", cache), ("past_value", cache), ("seqlens_k", TensorProto.INT32),
             ("cos", TensorProto.FLOAT), ("sin", TensorProto.FLOAT), ("kv_pages", TensorProto.INT32)]
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in specs]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("present_key", cache, None),
               helper.make_tensor_value_info("present_value", cache, None)]
    node = helper.make_node("Attention", [i.name for i in inputs], [o.name for o in outputs], domain="ai.tokenwire",
                            num_heads=heads, kv_num_heads=kv_heads, scale=d ** -0.5, kv_format=kv_format, **attrs)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tokenwire", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def decode_us(library: str, shape: str, context: int, batch: int, kv_format: str, threads: int, calls: int,
              rounds: int, clock=time.perf_counter) -> float:
    """Median over rounds of the mean microseconds of `calls` decode calls (rows `context` long)."""
    import onnxruntime as ort

    heads, kv_heads, d, attrs = SHAPES[shape]
    session = _session(library, heads, kv_heads, d, kv_format, attrs, threads)
    rng = np.random.default_rng(0)
    per_row = -(-context // PAGE)
    row = d + d // 4 if kv_format == "int8" else d
    dtype = np.uint8 if kv_format == "int8" else np.float16
    pool = [(rng.integers(0, 255, (batch * per_row, kv_heads, PAGE, row)) if kv_format == "int8"
             else rng.standard_normal((batch * per_row, kv_heads, PAGE, row))).astype(dtype) for _ in range(2)]
    if kv_format == "int8":  # the rows' tails hold fp16 scales and minimums: valid ones, not random bits
        for buf in pool:
            buf[..., d:] = np.full((d // 8,), 0.01, np.float16).view(np.uint8)
    pages = rng.permutation(batch * per_row).astype(np.int32).reshape(batch, per_row)
    angles = np.outer(np.arange(context + 1), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    feeds = {"qkv": rng.standard_normal((batch, 1, (heads + 2 * kv_heads) * d)).astype(np.float32),
             "seqlens_k": np.full(batch, context - 1, np.int32), "cos": np.cos(angles).astype(np.float32),
             "sin": np.sin(angles).astype(np.float32), "kv_pages": pages}
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for kind, buf in zip(("key", "value"), pool, strict=True):
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        binding.bind_ortvalue_input(f"past_{kind}", value)
        binding.bind_ortvalue_output(f"present_{kind}", value)
    binding.bind_output("out")
    for _ in range(max(5, calls // 10)):
        session.run_with_iobinding(binding)
    means = []
    for _ in range(rounds):
        start = clock()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        means.append((clock() - start) / calls * 1e6)
    return statistics.median(means)


def _isa_of(library: str) -> str:
    """The instruction set the loaded library runs (the same handle onnxruntime loaded)."""
    lib = ctypes.CDLL(library)
    lib.tw_native_isa.restype = ctypes.c_char_p
    return lib.tw_native_isa().decode()


def _child(args: argparse.Namespace, isa: str) -> list[dict]:
    """This script again with TOKENWIRE_NATIVE_ISA set: one ISA per process."""
    cmd = [sys.executable, __file__, "--isa", isa, "--json-rows", *args.passthrough]
    done = subprocess.run(cmd, env={**os.environ, "TOKENWIRE_NATIVE_ISA": isa}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {isa} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", default="both", choices=["both", "avx512", "avx2"])
    parser.add_argument("--library", default="", help="the kernels' .so (default: this checkout's build)")
    parser.add_argument("--shapes", default="smollm2,gemma3")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--kv-format", default="float16", choices=["float16", "int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--json-rows", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="attention_op.json")
    args, _ = parser.parse_known_args()
    args.passthrough = [a for a in sys.argv[1:] if a not in ("--json-rows",)]
    while "--isa" in args.passthrough:  # the child gets its own
        i = args.passthrough.index("--isa")
        del args.passthrough[i:i + 2]
    if args.isa == "both":
        rows = _child(args, "avx512") + _child(args, "avx2")
    else:
        if args.isa == "avx2":
            os.environ["TOKENWIRE_NATIVE_ISA"] = "avx2"  # read once, when the library first runs
        from tokenwire.server.native import loader

        library = args.library or str(loader.require())
        if _isa_of(library) != args.isa:
            raise SystemExit(f"the kernels run {_isa_of(library)!r} here, not {args.isa}")
        rows = []
        for shape in args.shapes.split(","):
            for context in (int(c) for c in args.contexts.split(",")):
                for batch in (int(b) for b in args.batches.split(",")):
                    us = decode_us(library, shape, context, batch, args.kv_format, args.threads, args.calls,
                                   args.rounds, time.thread_time if args.clock == "cpu" else time.perf_counter)
                    rows.append({"isa": args.isa, "shape": shape, "context": context, "batch": batch,
                                 "kv_format": args.kv_format, "threads": args.threads, "clock": args.clock,
                                 "us_per_call": us})
        if args.json_rows:
            print(json.dumps(rows))
            return
    print(table(["isa", "shape", "context", "batch", "kv", "threads", "µs/call"],
                [[r["isa"], r["shape"], r["context"], r["batch"], r["kv_format"], r["threads"], r["us_per_call"]]
                 for r in rows]))
    print(f"wrote {write_json(args.out, {'library': args.library or 'this checkout', 'rows': rows})}")


if __name__ == "__main__":
    main()
