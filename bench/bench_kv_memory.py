"""KV memory of 16 concurrent chats of mixed length, measured in a real server.

    .venv/bin/python bench/bench_kv_memory.py [--max-tokens 48]

16 streams at once through gRPC (one chat of ~1,800 tokens of history, 15 of 60-400), all
decoding together; while all 16 run, the server's own gauges (`tokenwire_kv_bytes` allocated /
used / reserved and `tokenwire_kv_positions`) are sampled. Reported against the sum of the
sequences' own lengths (positions x bytes per position, from the model's config): the target is
allocated KV within 1.2x of it. The dense-row layout the native graph had before (every row as
long as the longest) is computed for comparison. Writes bench/results/kv_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, long_prompt, running_server, table, write_json  # noqa: E402

from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402
from tokenwire.server.models.store import ModelStore, default_store_path  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "smollm2-135m:int4"
LENGTHS = [1800, 60, 90, 120, 150, 180, 210, 240, 270, 300, 330, 360, 380, 400, 75, 135]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def one(stub, prompt: str, max_tokens: int) -> int:
    request = pb.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=max_tokens, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0))
    tokens = 0
    async for event in stub.Generate(request):
        if event.HasField("token"):
            tokens += 1
    return tokens


async def run(target: str, metrics_url: str, prompts: list[str], max_tokens: int) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        tasks = [asyncio.create_task(one(stub, p, max_tokens)) for p in prompts]
        best: dict = {}
        while not all(t.done() for t in tasks):
            samples = scrape(metrics_url)
            key = (("model", MODEL),)
            batch = samples.get(("tokenwire_batch_size", key), 0)
            positions = samples.get(("tokenwire_kv_positions", key), 0)
            if batch == len(prompts) and positions > best.get("positions", 0):
                best = {"positions": positions, **{kind: samples.get(
                    ("tokenwire_kv_bytes", (("kind", kind), ("model", MODEL))), 0)
                    for kind in ("allocated", "used", "reserved")}}
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    entry = ModelStore(default_store_path()).get(MODEL)
    config = json.loads((entry.path / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_position = config["num_hidden_layers"] * 2 * kv_heads * head_dim * 2  # fp16 keys and values
    tok = TokenizerBundle(entry.path)
    prompts = [long_prompt(tok, n) for n in LENGTHS]
    port = free_port()
    with running_server("--max-running", "16", "--metrics-port", str(port), "--prefix-cache-bytes", "0") as target:
        started = time.perf_counter()
        best = asyncio.run(run(target, f"http://127.0.0.1:{port}/metrics", prompts, args.max_tokens))
        seconds = time.perf_counter() - started
    if not best:
        raise SystemExit("the 16 streams were never all decoding at once: nothing measured")
    own = best["positions"] * per_position
    longest = max(LENGTHS) + args.max_tokens
    dense = len(LENGTHS) * longest * per_position
    rows = [
        ["sum of the sequences' own lengths", f"{own / 1e6:.1f}", "1.00x"],
        ["pages the sequences hold (used)", f"{best['used'] / 1e6:.1f}", f"{best['used'] / own:.2f}x"],
        ["pool allocated (what the process holds)", f"{best['allocated'] / 1e6:.1f}", f"{best['allocated'] / own:.2f}x"],
        ["reserved by admission (prompt + max_tokens)", f"{best['reserved'] / 1e6:.1f}",
         f"{best['reserved'] / own:.2f}x"],
        ["dense rows as long as the longest (before)", f"{dense / 1e6:.1f}", f"{dense / own:.2f}x"],
    ]
    print(f"16 concurrent streams of mixed length ({min(LENGTHS)}-{max(LENGTHS)} prompt tokens, "
          f"{args.max_tokens} new), sampled at {best['positions']:.0f} positions held, {seconds:.1f} s:")
    print(table(["KV", "MB", "vs own lengths"], rows))
    path = write_json("kv_memory.json", {"lengths": LENGTHS, "max_tokens": args.max_tokens,
                                         "bytes_per_position": per_position, **best, "own_bytes": own,
                                         "dense_bytes": dense, "allocated_ratio": best["allocated"] / own})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
