"""Single-stream speed of each default variant over gRPC: decode tok/s and time to first token.

Runs two servers (default kernels, and `--kernels onnxruntime` so the int4 model's native
kernels are compared with onnxruntime's on the same weights), then per variant (interleaved,
after a warm-up): 5 generations of 128 greedy tokens from a short prompt (decode tok/s, from
the server's usage), 5 prefills of a 533-token prompt (time to first token as the client sees
it) and decodes at 100 and 2,000 tokens of context. Prints medians, writes JSON.

    .venv/bin/python bench/bench_single.py [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHORT_PROMPT, long_prompt, median, running_server, table, write_json  # noqa: E402

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
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = ModelStore()
    tokenizer = TokenizerBundle(store.get(INT4).path)
    prompt_533 = long_prompt(tokenizer, 533)
    n_long = len(tokenizer.encode(prompt_533))
    prompt_100, prompt_2000 = long_prompt(tokenizer, 100), long_prompt(tokenizer, 2000)
    results: dict[str, dict[str, list[float]]] = {
        v: {"decode_tps": [], "ttft_short_ms": [], "ttft_533_ms": [], "decode_tps_ctx100": [], "decode_tps_ctx2000": []}
        for v in VARIANTS}
    with (running_server("--prefix-cache-bytes", "0") as default,
          running_server("--prefix-cache-bytes", "0", "--kernels", "onnxruntime") as plain,
          grpc.insecure_channel(default) as ch_default, grpc.insecure_channel(plain) as ch_plain):
        stubs = {"default": pb_grpc.InferenceStub(ch_default), "onnxruntime": pb_grpc.InferenceStub(ch_plain)}
        for model, server in VARIANTS.values():  # load + warm up
            generate(stubs[server], model, SHORT_PROMPT, 16)
            generate(stubs[server], model, prompt_533, 1)
        for _ in range(args.runs):
            for v, (model, server) in VARIANTS.items():
                stub = stubs[server]
                ttft, usage = generate(stub, model, SHORT_PROMPT, 128)
                results[v]["decode_tps"].append(usage.decode_tokens_per_second)
                results[v]["ttft_short_ms"].append(ttft)
                ttft, _ = generate(stub, model, prompt_533, 1)
                results[v]["ttft_533_ms"].append(ttft)
                for key, prompt in (("decode_tps_ctx100", prompt_100), ("decode_tps_ctx2000", prompt_2000)):
                    results[v][key].append(generate(stub, model, prompt, 128)[1].decode_tokens_per_second)
    rows = []
    summary = {}
    for v in VARIANTS:
        r = results[v]
        summary[v] = {k: median(vals) for k, vals in r.items()}
        rows.append([v, median(r["decode_tps"]), median(r["ttft_short_ms"]), median(r["ttft_533_ms"]),
                     median(r["decode_tps_ctx100"]), median(r["decode_tps_ctx2000"]),
                     median(r["decode_tps_ctx2000"]) / median(r["decode_tps_ctx100"])])
    print(f"single stream over gRPC, greedy, 128 new tokens, median of {args.runs} (prompt of {n_long} tokens for TTFT)")
    print(table(["model", "decode tok/s", "TTFT short prompt (ms)", f"TTFT {n_long}-token prompt (ms)",
                 "decode tok/s @100 ctx", "decode tok/s @2000 ctx", "2000/100"], rows))
    path = write_json("single.json", {"runs": args.runs, "long_prompt_tokens": n_long, "median": summary, "raw": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
