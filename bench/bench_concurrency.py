"""Many clients at once over real sockets: throughput and latency per concurrency level,
multi-turn chat with prefix reuse on and off, and an overload of 200 clients.

    .venv/bin/python bench/bench_concurrency.py [--levels 1,2,4,8,16] [--max-tokens 128]

Prints tables and writes bench/results/concurrency.json. Runs its own servers: `--device`,
`--models-dir`, `--max-batch` and `--queue-size` go to them (bench/gpu_check.sh: `--device cuda
--levels 1,8,32,64 --max-batch 64`); `--sections` picks what to run (levels, chat, overload).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SERVER_PIDS,
    gpu_memory_mb,
    median,
    percentile,
    rss_mb,
    running_server,
    table,
    write_json,
)

from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = [  # a few lengths: short, medium, long
    "Write a short story about a lighthouse keeper.",
    "Explain, step by step and with examples, how a compiler turns source code into machine code. "
    "Cover lexing, parsing, semantic analysis, intermediate representations, optimisation passes, "
    "register allocation and code generation, and say what can go wrong at each stage and why.",
    " ".join(["The history of the printing press is a story of ideas travelling faster than ever before."] * 12)
    + " Summarise it.",
]
CHAT_TURNS = [
    "Hi! My name is Ada and I live in Lisbon.",
    "What is a good name for a cat?",
    "Give me a recipe for pancakes.",
    "How do airplanes fly?",
    "Write a haiku about rain.",
    "What are three tips for learning to code?",
    "Tell me a fun fact about octopuses.",
    "How far is the Moon?",
    "Suggest a weekend plan in Lisbon.",
    "What is my name, and where do I live?",
]


async def stream(stub, request: pb.GenerateRequest) -> dict:
    started = time.perf_counter()
    arrivals: list[float] = []
    queued_before_first = False
    usage = None
    try:
        async for response in stub.Generate(request, timeout=600):
            kind = response.WhichOneof("event")
            if kind == "token":
                arrivals.append(time.perf_counter())
            elif kind == "queued" and not arrivals:
                queued_before_first = True
            elif kind == "finished":
                usage = response.finished.usage
        status = "ok"
    except grpc.aio.AioRpcError as exc:
        status = exc.code().name
    ended = time.perf_counter()
    return {
        "status": status,
        "started": started,
        "ended": ended,
        "ttft": (arrivals[0] - started) if arrivals else None,
        "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "tokens": len(arrivals),
        "decode_tps": usage.decode_tokens_per_second if usage else 0.0,
        "queued_before_first": queued_before_first,
    }


async def level(stub, n: int, max_tokens: int) -> dict:
    requests = [
        pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, ignore_eos=True,
                           sampling=pb.SamplingParams(temperature=0.8, seed=i), user=f"user{i}")
        for i in range(n)
    ]
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(stub, r) for r in requests))
    wall = max(r["ended"] for r in results) - started
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    itls = [x for r in results for x in r["itl"]]
    per_stream = [r["tokens"] / (r["ended"] - r["started"]) for r in results]
    return {
        "n": n,
        "aggregate_tps": tokens / wall,
        "per_stream_tps": median(per_stream),
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1000,
        "itl_p50_ms": percentile(itls, 0.5) * 1000,
        "itl_p99_ms": percentile(itls, 0.99) * 1000,
        "tokens": tokens,
        "wall_s": wall,
    }


async def chat_turns(stub, reply_tokens: int) -> list[float]:
    """TTFT (ms) of each turn of a 10-turn chat whose history grows with each greedy reply."""
    messages: list[pb.ChatMessage] = []
    ttfts = []
    for user_text in CHAT_TURNS:
        messages.append(pb.ChatMessage(role="user", content=user_text))
        request = pb.GenerateRequest(messages=messages, max_tokens=reply_tokens, ignore_eos=False,
                                     sampling=pb.SamplingParams(temperature=0.0))
        result_text = []
        started = time.perf_counter()
        first = None
        async for response in stub.Generate(request, timeout=600):
            if response.WhichOneof("event") == "token":
                first = first or time.perf_counter()
                result_text.append(response.token.text)
        ttfts.append(((first or time.perf_counter()) - started) * 1000)
        messages.append(pb.ChatMessage(role="assistant", content="".join(result_text)))
    return ttfts


async def overload(stub, clients: int, max_tokens: int) -> dict:
    results = await asyncio.gather(*(
        stream(stub, pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=max_tokens, ignore_eos=True, user=f"u{i}"))
        for i in range(clients)
    ))
    refused = [r for r in results if r["status"] == "RESOURCE_EXHAUSTED"]
    streamed = [r for r in results if r["status"] == "ok" and r["tokens"]]
    waited = [r for r in streamed if r["ttft"] and r["ttft"] > 0.5]
    return {
        "clients": clients,
        "streamed": len(streamed),
        "refused": len(refused),
        "other": len(results) - len(streamed) - len(refused),
        "refusal_ms_max": max(((r["ended"] - r["started"]) * 1000 for r in refused), default=0.0),
        "waited_without_queue_event": sum(1 for r in waited if not r["queued_before_first"]),
    }



def server_flags(args) -> list[str]:
    flags = ["--device", args.device]
    return flags + (["--models-dir", str(args.models_dir)] if args.models_dir is not None else [])


async def run(args) -> dict:
    out: dict = {}
    flags = server_flags(args)
    with running_server(*flags, "--max-batch", str(args.max_batch), "--queue-size", str(args.queue_size)) as target:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            await stream(stub, pb.GenerateRequest(prompt="warm up", max_tokens=4))
            pid = SERVER_PIDS[target]
            if "levels" in args.sections:
                out["levels"] = [await level(stub, n, args.max_tokens) for n in args.levels]
                out["memory_after_levels"] = {"rss_mb": rss_mb(pid)}
                if args.device == "cuda":
                    out["memory_after_levels"]["gpu_mb"] = gpu_memory_mb(pid)
            if "chat" in args.sections:
                out["chat_reuse_on_ttft_ms"] = await chat_turns(stub, args.reply_tokens)
            if "overload" in args.sections:
                before = rss_mb(pid)
                out["overload"] = await overload(stub, args.overload_clients, 16)
                out["overload"]["rss_mb_before"] = before
                out["overload"]["rss_mb_after"] = rss_mb(pid)
    if "chat" in args.sections:
        with running_server(*flags, "--prefix-cache-bytes", "0") as target:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.InferenceStub(channel)
                await stream(stub, pb.GenerateRequest(prompt="warm up", max_tokens=4))
                out["chat_reuse_off_ttft_ms"] = await chat_turns(stub, args.reply_tokens)
    return out


SECTIONS = ("levels", "chat", "overload")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the servers' --device")
    parser.add_argument("--models-dir", type=Path, default=None, help="the model store (default: the usual one)")
    parser.add_argument("--max-batch", type=int, default=16, help="the first server's --max-batch")
    parser.add_argument("--queue-size", type=int, default=32, help="the first server's --queue-size")
    parser.add_argument("--overload-clients", type=int, default=200)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.sections = [x for x in args.sections.split(",") if x]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    out = asyncio.run(run(args))
    if "levels" in out:
        single = out["levels"][0]["aggregate_tps"]
        rows = [[lv["n"], lv["aggregate_tps"], lv["aggregate_tps"] / single, lv["per_stream_tps"], lv["ttft_p50_ms"],
                 lv["ttft_p95_ms"], lv["itl_p50_ms"], lv["itl_p99_ms"]] for lv in out["levels"]]
        print(f"concurrent streams on {args.device}, default model, {args.max_tokens} tokens each, temperature 0.8")
        print(table(["N", "aggregate tok/s", "× N=1", "per-stream tok/s", "TTFT p50 ms", "TTFT p95 ms",
                     "ITL p50 ms", "ITL p99 ms"], rows))
    if "chat_reuse_on_ttft_ms" in out:
        on, off = out["chat_reuse_on_ttft_ms"], out["chat_reuse_off_ttft_ms"]
        print("\nmulti-turn chat, time to first token per turn (ms)")
        print(table(["turn"] + [str(i + 1) for i in range(len(on))],
                    [["reuse on"] + on, ["reuse off"] + off]))
        print(f"turn 10 / turn 1 with reuse: {on[-1] / on[0]:.2f}×; turn 10 without / with reuse: "
              f"{off[-1] / on[-1]:.1f}×")
    if "overload" in out:
        ov = out["overload"]
        print(f"\noverload: {ov['clients']} clients, queue {args.queue_size}: {ov['streamed']} streamed, "
              f"{ov['refused']} refused (slowest refusal {ov['refusal_ms_max']:.0f} ms), {ov['other']} other, "
              f"{ov['waited_without_queue_event']} waited without a queue event; "
              f"server RSS {ov['rss_mb_before']:.0f} MB before, {ov['rss_mb_after']:.0f} MB after")
    path = write_json("concurrency.json", {"args": {**vars(args), "models_dir": str(args.models_dir)}, **out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
