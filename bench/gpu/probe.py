"""The engine alone on a device, no server: where each op runs, and what a step costs.

    python bench/gpu/probe.py STORE --device cuda --out probe.json [--batches 1,8,32,64] [--steps 32]

STORE is a model store from tests/random_weight_models.py. Writes JSON with:
- `placement`: per op type, how many of its nodes ran on which execution provider, and their
  host-side time over one prefill and `--steps` decode steps (onnxruntime's profiler; on CUDA
  a kernel's host time is mostly its launch), so ops left on the CPU show at once;
- `decode_ms_per_step` per batch size (rows of 32-token prompts, teacher-forced), engine only;
- `prefill_ms`: a 533-token prompt; `row_bookkeeping`: one sequence joining and one leaving a
  batch of the largest size, and the step after each, beside a steady step (with device buffers
  the KV is copied to the host and back then: see FastEngine);
- `gpu_memory_mb` (nvidia-smi) after the largest batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import gpu_memory_mb  # noqa: E402

from tokenwire.server.build.quality import eval_text  # noqa: E402
from tokenwire.server.engine.fast_engine import FastEngine  # noqa: E402
from tokenwire.server.engine.graph import GRAPH  # noqa: E402
from tokenwire.server.engine.session import providers_for  # noqa: E402
from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402
from tokenwire.server.models.store import ModelStore  # noqa: E402


def placement(folder: Path, device: str, ids: list[int], steps: int) -> dict:
    """Runs a profiled session through one prefill and `steps` decode steps; op type -> providers."""
    import onnxruntime as ort

    engine = FastEngine(folder, device=device, context_length=1024)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path("/tmp") / "tokenwire-probe")
    opts.log_severity_level = 3
    engine.session = ort.InferenceSession(str(folder / GRAPH), sess_options=opts, providers=providers_for(device))
    state = engine.new_prefill()
    logits = engine.prefill(state, ids[:32])
    engine.join(state)
    for _ in range(steps):
        logits = engine.step([int(np.argmax(logits))])[0]
    profile = Path(engine.session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink(missing_ok=True)
    ops: dict[str, dict] = defaultdict(lambda: {"nodes": defaultdict(set), "host_us": 0})
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "op_name" not in args or not event["name"].endswith("_kernel_time"):
            continue
        op = ops[args["op_name"]]
        op["nodes"][args.get("provider", "?")].add(event["name"].removesuffix("_kernel_time"))
        op["host_us"] += int(event.get("dur", 0))
    return {name: {"nodes_by_provider": {p: len(n) for p, n in op["nodes"].items()}, "host_ms": op["host_us"] / 1000}
            for name, op in sorted(ops.items(), key=lambda kv: -kv[1]["host_us"])}


def timed(fn, repeat: int = 1) -> float:
    """Median wall time of fn(), ms."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="", help="model id (default: the store's default)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    entry = ModelStore(args.store).find(args.model)
    if entry is None:
        sys.exit(f"no model {args.model or '(default)'} in {args.store}")
    ids = TokenizerBundle(entry.path).encode(eval_text())
    out: dict = {"model": entry.id, "device": args.device}

    started = time.perf_counter()
    engine = FastEngine(entry.path, device=args.device, context_length=2048)
    out["load_s"] = time.perf_counter() - started
    out["providers"] = engine.session.get_providers()
    out["placement"] = placement(entry.path, args.device, ids, args.steps)
    on_cpu = {op: p["nodes_by_provider"]["CPUExecutionProvider"] for op, p in out["placement"].items()
              if "CPUExecutionProvider" in p["nodes_by_provider"]}
    out["ops_on_cpu"] = on_cpu

    def prefill_533() -> None:
        state = engine.new_prefill()
        engine.prefill(state, ids[:533])
        engine.end_prefill(state)

    prefill_533()  # warm-up
    out["prefill_ms"] = {"tokens": 533, "ms": timed(prefill_533, 3)}

    decode: dict[str, float] = {}
    batches = [int(b) for b in args.batches.split(",") if b]
    for rows in batches:
        engine.reset()
        feeds = []
        for r in range(rows):
            start = (r * 37) % (len(ids) - 32 - args.steps - 1)
            state = engine.new_prefill()
            engine.prefill(state, ids[start:start + 32])
            engine.join(state)
            feeds.append(ids[start + 32:])
        engine.step([f[0] for f in feeds])  # warm-up (the binding of this batch)
        started = time.perf_counter()
        for s in range(1, args.steps + 1):
            engine.step([f[s] for f in feeds])
        decode[str(rows)] = (time.perf_counter() - started) * 1000 / args.steps
        print(f"batch {rows}: {decode[str(rows)]:.2f} ms/step ({rows * 1000 / decode[str(rows)]:.0f} tok/s)", flush=True)
    out["decode_ms_per_step"] = decode
    out["decode_tok_s"] = {b: int(b) * 1000 / ms for b, ms in decode.items()}

    # One more sequence joins the largest batch, then one leaves: the row bookkeeping's cost
    # (with device buffers: the copy back to the host, then the first step's upload).
    def step() -> None:
        engine.step([1] * len(engine.lengths))

    state = engine.new_prefill()
    engine.prefill(state, ids[:32])
    rows = {"rows": len(engine.lengths) + 1, "steady_step_ms": timed(step, 3)}
    rows["join_ms"] = timed(lambda: engine.join(state))
    rows["first_step_after_join_ms"] = timed(step)
    rows["remove_ms"] = timed(lambda: engine.remove([0]))
    rows["first_step_after_remove_ms"] = timed(step)
    out["row_bookkeeping"] = rows
    out["kv_bytes"] = engine.kv_bytes
    if args.device != "cpu":
        out["gpu_memory_mb"] = gpu_memory_mb()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "placement"}, indent=1))


if __name__ == "__main__":
    main()
