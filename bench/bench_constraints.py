"""What constrained decoding costs: decode tok/s of JSON-Schema-constrained generations against free
ones, side by side in one run, at 1 and 8 concurrent streams (medians of --runs).

Every request decodes exactly --tokens tokens: the free ones with ignore_eos, the constrained ones
with a schema whose one string field is long enough never to close before --tokens, so both
decode the same number of steps and only the mask differs.

    .venv/bin/python bench/bench_constraints.py [--runs 5] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, running_server, table, write_json  # noqa: E402

from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "smollm2-135m:int4"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}


def one(stub, constrained: bool, tokens: int, out: list[float]) -> None:
    sampling = pb.SamplingParams(temperature=0.8, seed=1)
    if constrained:
        sampling.json_schema = json.dumps(SCHEMA)
    request = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="Write a long story.")],
                                 max_tokens=tokens, ignore_eos=not constrained, sampling=sampling)
    for response in stub.Generate(request, timeout=600):
        if response.HasField("finished"):
            out.append(response.finished.usage.decode_tokens_per_second)


def aggregate(stub, constrained: bool, streams: int, tokens: int) -> float:
    """Mean per-stream decode tok/s x streams (the aggregate rate)."""
    rates: list[float] = []
    threads = [threading.Thread(target=one, args=(stub, constrained, tokens, rates)) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with running_server("--metrics-port", "0") as target:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            aggregate(stub, True, 1, 8)  # warm-up: the model loaded, the grammar tokenizer built
            aggregate(stub, False, 1, 8)
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                for streams in (1, 8):
                    for constrained in (False, True):
                        key = f"{streams} stream{'s' if streams > 1 else ''}, {'json_schema' if constrained else 'free'}"
                        results.setdefault(key, []).append(aggregate(stub, constrained, streams, args.tokens))
    rows = []
    for streams in (1, 8):
        label = f"{streams} stream{'s' if streams > 1 else ''}"
        free, constrained = median(results[f"{label}, free"]), median(results[f"{label}, json_schema"])
        rows.append([label, free, constrained, constrained / free])
    print(f"\nDecode tok/s (aggregate), {MODEL}, {args.tokens} tokens a stream, medians of {args.runs}, one run:")
    print(table(["streams", "free", "json_schema", "ratio"], rows))
    print(f"\nwrote {write_json('constraints.json', {'model': MODEL, 'tokens': args.tokens, 'results': results})}")


if __name__ == "__main__":
    main()
