"""The native graph's KV cache formats side by side: decode speed at two context lengths, in one
process, engine steps only (no server), and teacher-forced agreement of decode steps with fp32.

Each model folder is opened as a PagedEngine; per round (interleaved, after a warm-up), each
engine decodes `--steps` greedy tokens from a cached prefix of each context length (the prefix
prefilled once, restored per round through new_prefill, so every round starts from the same
KV). Prints medians of `--rounds` rounds and writes JSON.

`--clock cpu` times the calling thread's CPU time instead of the wall clock (with `--threads 1`,
where onnxruntime computes on the calling thread): on a machine others are loading, waiting for a
core is left out of the figure.

`--agreement` also decodes the fixed 2,048-token evaluation text one token per step
(teacher-forced: the cache written the way decoding writes it, block by block) and reports the
top-1 agreement of each position's next token with the fp32 model's.

    .venv/bin/python bench/bench_kv_format.py FOLDER_FP16 FOLDER_INT8 [--contexts 100,2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import long_prompt, table, write_json  # noqa: E402

from tokenwire.server.engine.fast_engine import FastEngine  # noqa: E402
from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402


def decode_seconds(engine, prefix, length: int, first: int, steps: int, clock=time.perf_counter) -> float:
    """Seconds per step of `steps` greedy steps from a restored prefix of `length` tokens."""
    state = engine.new_prefill(prefix, length)
    engine.join(state)
    token = first
    start = clock()
    for _ in range(steps):
        token = int(engine.step([token])[0].argmax())
    elapsed = clock() - start
    engine.remove([0])
    return elapsed / steps


def teacher_forced_logits(engine, tokens: list[int]) -> np.ndarray:
    """Next-token logits of every position, the first token prefilled and every other one a step."""
    state = engine.new_prefill()
    out = [engine.prefill(state, tokens[:1])]
    engine.join(state)
    for t in tokens[1:-1]:
        out.append(engine.step([t])[0].copy())
    engine.remove([0])
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="model folders (native graphs) to compare")
    parser.add_argument("--contexts", default="100,2000")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--agreement", type=Path, default=None, metavar="FP32_FOLDER",
                        help="also measure teacher-forced decode agreement against this fp32 model")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (onnxruntime's own threads are not this thread)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    tokenizer = TokenizerBundle(args.folders[0])
    engines = {str(f): FastEngine(f, threads=args.threads, context_length=max(contexts) + args.steps + 8)
               for f in args.folders}
    prompts = {c: tokenizer.encode(long_prompt(tokenizer, c))[:c] for c in contexts}
    prefixes = {}
    for name, engine in engines.items():
        for c, ids in prompts.items():
            state = engine.new_prefill()
            logits = engine.prefill(state, ids)
            engine.join(state)
            prefixes[name, c] = (engine.row_cache(0), int(logits.argmax()))
            engine.remove([0])
    times: dict[tuple[str, int], list[float]] = {key: [] for key in prefixes}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, engine in engines.items():
            for c in contexts:
                kv, first = prefixes[name, c]
                seconds = decode_seconds(engine, kv, c, first, args.steps, clock)
                if round_:
                    times[name, c].append(seconds)
    rows, result = [], {}
    for name, engine in engines.items():
        tps = [1.0 / statistics.median(times[name, c]) for c in contexts]
        entry = {"kv_dtype": np.dtype(engine.dtype).name, "clock": args.clock, "threads": args.threads, **{f"decode_tps_ctx{c}": t for c, t in zip(contexts, tps, strict=True)},
                 "ratio": tps[-1] / tps[0]}
        rows.append([name, entry["kv_dtype"], *(f"{t:.1f}" for t in tps), f"{entry['ratio']:.2f}"])
        result[name] = entry
    print(table(["model", "cache", *(f"tok/s @{c}" for c in contexts), f"{contexts[-1]}/{contexts[0]}"], rows))
    if args.agreement:
        from tokenwire.server.build.quality import eval_text
        from tokenwire.server.engine.optimum_engine import OptimumEngine
        from tokenwire.server.engine.sampling import log_softmax

        tokens = TokenizerBundle(args.agreement).encode(eval_text())[:2048]
        reference = OptimumEngine(args.agreement / "model.onnx").full_logits(tokens)[:-1].argmax(-1)
        for name, engine in engines.items():
            top1 = log_softmax(teacher_forced_logits(engine, tokens).astype(np.float64)).argmax(-1)
            result[name]["decode_top1_agreement"] = float((top1 == reference).mean())
            print(f"{name}: teacher-forced decode agreement with fp32 {result[name]['decode_top1_agreement']:.4%}")
    write_json("kv_format.json", result)


if __name__ == "__main__":
    main()
