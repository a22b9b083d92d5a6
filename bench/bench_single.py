"""Single-stream speed of each default variant over gRPC: decode tok/s and time to first token.

Runs two servers (default kernels, and `--kernels onnxruntime` so the int4 model's native
kernels are compared with onnxruntime's on the same weights), then per variant (interleaved,
after a warm-up): 5 generations of 128 greedy tokens from a short prompt (decode tok/s, from
the server's usage), 5 prefills of a 533-token prompt (time to first token as the client sees
it) and decodes at 100 and 2,000 tokens of context. Prints medians, writes JSON.

    .venv/bin/python bench/bench_single.py [--runs 5]

On another store or device (bench/gpu_check.sh): `--device cuda --models-dir STORE --model ID`
serves only the named models, from one server (`--kernels` choices are CPU kernels);
`--max-tokens`, `--contexts` and `--long-prompt` shorten a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SERVER_PIDS,
    SHORT_PROMPT,
    gpu_memory_mb,
    long_prompt,
    median,
    rss_mb,
    running_server,
    table,
    write_json,
)

from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402
from tokenwire.server.models.store import ModelStore  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

INT4, FP32 = "smollm2-135m:int4", "smollm2-135m:fp32"
# label -> (model, server): "default" serves with --kernels auto, "onnxruntime" with --kernels onnxruntime.
VARIANTS = {
    INT4: (INT4, "default"),
    INT4 + " (onnxruntime kernels)": (INT4, "onnxruntime"),
    FP32: (FP32, "default"),
}


def generate(stub, model: str, prompt: str, max_tokens: int) -> tuple[float, pb.Usage]:
    request = pb.GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens,
                                 sampling=pb.SamplingParams(temperature=0.0), ignore_eos=True)
    started = time.perf_counter()
    ttft = None
    usage = None
    for response in stub.Generate(request, timeout=600):
        kind = response.WhichOneof("event")
        if kind == "token" and ttft is None:
            ttft = (time.perf_counter() - started) * 1000
        elif kind == "finished":
            usage = response.finished.usage
    return ttft or 0.0, usage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the servers' --device")
    parser.add_argument("--models-dir", type=Path, default=None, help="the model store (default: the usual one)")
    parser.add_argument("--model", action="append", default=[],
                        help="a model id to measure (repeatable); default: the default model's variants")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per decode measurement")
    parser.add_argument("--contexts", default="100,2000", help="context lengths of the decode-at-context runs")
    parser.add_argument("--long-prompt", type=int, default=533, help="prompt tokens of the TTFT measurement")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    variants = {m: (m, "default") for m in args.model} if args.model else VARIANTS
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = ModelStore(args.models_dir)
    first = store.find(next(iter(variants.values()))[0])
    if first is None:
        sys.exit(f"no model {next(iter(variants))} in {store.root}")
    tokenizer = TokenizerBundle(first.path)
    prompt_long = long_prompt(tokenizer, args.long_prompt)
    n_long = len(tokenizer.encode(prompt_long))
    ttft_key = f"ttft_{args.long_prompt}_ms"
    ctx_prompts = {f"decode_tps_ctx{c}": long_prompt(tokenizer, c) for c in contexts}
    results: dict[str, dict[str, list[float]]] = {
        v: {"decode_tps": [], "ttft_short_ms": [], ttft_key: [], **{k: [] for k in ctx_prompts}} for v in variants}
    common = ["--prefix-cache-bytes", "0", "--device", args.device]
    if args.models_dir is not None:
        common += ["--models-dir", str(args.models_dir)]
    memory: dict[str, dict] = {}
    with ExitStack() as stack:
        stubs = {}
        for server in sorted({server for _, server in variants.values()}):
            extra = ["--kernels", "onnxruntime"] if server == "onnxruntime" else []
            target = stack.enter_context(running_server(*common, *extra))
            stubs[server] = (pb_grpc.InferenceStub(stack.enter_context(grpc.insecure_channel(target))), target)
        for model, server in variants.values():  # load + warm up
            generate(stubs[server][0], model, SHORT_PROMPT, 16)
            generate(stubs[server][0], model, prompt_long, 1)
        for _ in range(args.runs):
            for v, (model, server) in variants.items():
                stub = stubs[server][0]
                ttft, usage = generate(stub, model, SHORT_PROMPT, args.max_tokens)
                results[v]["decode_tps"].append(usage.decode_tokens_per_second)
                results[v]["ttft_short_ms"].append(ttft)
                ttft, _ = generate(stub, model, prompt_long, 1)
                results[v][ttft_key].append(ttft)
                for key, prompt in ctx_prompts.items():
                    results[v][key].append(generate(stub, model, prompt, args.max_tokens)[1].decode_tokens_per_second)
        for server, (_, target) in stubs.items():
            pid = SERVER_PIDS[target]
            memory[server] = {"rss_mb": rss_mb(pid)}
            if args.device == "cuda":
                memory[server]["gpu_mb"] = gpu_memory_mb(pid)
    rows = []
    summary = {}
    ctx_keys = list(ctx_prompts)
    for v in variants:
        r = results[v]
        summary[v] = {k: median(vals) for k, vals in r.items()}
        row = [v, median(r["decode_tps"]), median(r["ttft_short_ms"]), median(r[ttft_key])]
        row += [median(r[k]) for k in ctx_keys]
        if len(ctx_keys) >= 2:
            row.append(median(r[ctx_keys[-1]]) / median(r[ctx_keys[0]]))
        rows.append(row)
    headers = ["model", "decode tok/s", "TTFT short prompt (ms)", f"TTFT {n_long}-token prompt (ms)"]
    headers += [f"decode tok/s @{c} ctx" for c in contexts]
    if len(contexts) >= 2:
        headers.append(f"{contexts[-1]}/{contexts[0]}")
    print(f"single stream over gRPC on {args.device}, greedy, {args.max_tokens} new tokens, median of {args.runs} "
          f"(prompt of {n_long} tokens for TTFT)")
    print(table(headers, rows))
    path = write_json("single.json", {"runs": args.runs, "device": args.device, "max_tokens": args.max_tokens,
                                      "long_prompt_tokens": n_long, "median": summary, "memory": memory,
                                      "raw": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
