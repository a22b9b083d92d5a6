"""What private prefix caches cost when users share a system prompt, and what marking it shared
(--shared-prefix-file) wins back: time to first token of a user's first request whose system
prompt (about 400 tokens) another user has just sent.

Three servers side by side, one run: no API keys (one cache for everyone: the prompt is reused,
but so would anyone's prefix be), API keys with private caches (the default with keys: each user
prefills the prompt), and API keys with the prompt marked shared (exactly that prefix reused
across users). Per round a fresh pair of users: the first warms the cache, the second is timed.

    .venv/bin/python bench/bench_shared_prefix.py [--runs 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, long_prompt, median, running_server, table, write_json  # noqa: E402

from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402
from tokenwire.server.models.store import ModelStore  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "smollm2-135m:int4"


def make_keys(database: str, n: int) -> list[str]:
    keys = []
    for i in range(n):
        done = subprocess.run([sys.executable, "-m", "tokenwire.clients.cli", "keys", "create", f"user{i}",
                               "--database", database], capture_output=True, text=True, check=True)
        keys.append(done.stdout.split()[0])
    return keys


def ask(stub, system: str, question: str, key: str | None) -> tuple[float, int]:
    request = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="system", content=system),
                                                        pb.ChatMessage(role="user", content=question)],
                                 max_tokens=4, ignore_eos=True, sampling=pb.SamplingParams(temperature=0.0))
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    started = time.perf_counter()
    ttft, cached = 0.0, 0
    for response in stub.Generate(request, timeout=300, metadata=metadata):
        if response.HasField("token") and not ttft:
            ttft = (time.perf_counter() - started) * 1000
        elif response.HasField("finished"):
            cached = response.finished.usage.cached_prompt_tokens
    return ttft, cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    store = ModelStore()
    tokenizer = TokenizerBundle(store.get(MODEL).path)
    system = long_prompt(tokenizer, 400)
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        shared_file = Path(tmp) / "shared.txt"
        shared_file.write_text(system + "\n")
        setups = {}
        for label, keyed, extra in (("no keys (one cache for all)", False, ()),
                                    ("keys, private caches", True, ()),
                                    ("keys, prompt marked shared", True, ("--shared-prefix-file", str(shared_file)))):
            database = str(Path(tmp) / f"{len(setups)}.db")
            keys = make_keys(database, 2 * args.runs + 1) if keyed else [None] * (2 * args.runs + 1)
            setups[label] = (database, keys, extra)
        results: dict[str, dict] = {}
        with running_server("--database", setups["no keys (one cache for all)"][0], "--metrics-port", "0") as a, \
                running_server("--database", setups["keys, private caches"][0], "--metrics-port", "0") as b, \
                running_server("--database", setups["keys, prompt marked shared"][0], "--metrics-port", "0",
                               *setups["keys, prompt marked shared"][2]) as c:
            targets = dict(zip(setups, (a, b, c), strict=True))
            channels = {label: grpc.insecure_channel(t) for label, t in targets.items()}
            stubs = {label: pb_grpc.InferenceStub(ch) for label, ch in channels.items()}
            for label, stub in stubs.items():  # warm-up: the model loaded, the kernels warm
                ask(stub, "You are terse.", "Hi", setups[label][1][-1])
                results[label] = {"ttft_ms": [], "cached": []}
            for run in range(args.runs):  # interleaved: each round on every server in turn
                for label, stub in stubs.items():
                    keys = setups[label][1]
                    ask(stub, system, f"Question {run}a: what is {run} plus one?", keys[2 * run])
                    ttft, cached = ask(stub, system, f"Question {run}b: name a colour.", keys[2 * run + 1])
                    results[label]["ttft_ms"].append(ttft)
                    results[label]["cached"].append(cached)
            for ch in channels.values():
                ch.close()
    prompt_tokens = len(tokenizer.encode_chat([{"role": "system", "content": system},
                                               {"role": "user", "content": "Question 0b: name a colour."}]))
    base = median(results["keys, private caches"]["ttft_ms"])
    rows = [[label, median(r["ttft_ms"]), median(r["cached"]), base / median(r["ttft_ms"])]
            for label, r in results.items()]
    print(f"\nAnother user's first request with the same {prompt_tokens}-token prompt ({MODEL}, "
          f"medians of {args.runs}, one run):")
    print(table(["setup", "TTFT ms", "cached prompt tokens", "speed-up vs private"], rows))
    path = write_json("shared_prefix.json", {"model": MODEL, "prompt_tokens": prompt_tokens, "runs": args.runs,
                                             "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
