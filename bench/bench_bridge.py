"""What the HTTP bridge costs: the same generation over gRPC directly and as SSE through the bridge.

Starts its own server and bridge (or uses --server / --bridge), warms both paths up, then runs
`--runs` rounds, each one generation per path (order alternating between rounds): default model,
the same short prompt, 128 greedy tokens with ignore_eos (so both paths make exactly 128).
Measured on the client: time to first token and decode tokens/s (tokens after the first over
the time from the first to the last). The server's own decode tok/s is shown beside it, so the
bridge's cost is the gap between the paths, not noise in the model. Prints medians, writes
bench/results/bridge.json.

    .venv/bin/python bench/bench_bridge.py [--runs 5] [--server HOST:PORT --bridge http://HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHORT_PROMPT, free_port, median, running_server, table, wait_http, write_json  # noqa: E402

from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402


@contextmanager
def running_bridge(target: str):
    """Starts `tokenwire bridge` for `target` on a free port; yields its URL."""
    port = free_port()
    log = open(RESULTS / f"bridge-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tokenwire.clients.cli", "bridge", "--server", target,
                             "--http-port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http(url + "/healthz", proc, 30):
            raise RuntimeError(f"bridge did not start; see {log.name}")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


class Run:
    def __init__(self, started: float) -> None:
        self.started = started
        self.arrivals: list[float] = []
        self.server_tps = 0.0

    def result(self) -> dict[str, float]:
        first, last, n = self.arrivals[0], self.arrivals[-1], len(self.arrivals)
        return {"ttft_ms": (first - self.started) * 1000, "decode_tps": (n - 1) / (last - first),
                "server_decode_tps": self.server_tps, "total_ms": (last - self.started) * 1000, "tokens": n}


async def over_grpc(stub: pb_grpc.InferenceStub, max_tokens: int) -> dict[str, float]:
    request = pb.GenerateRequest(prompt=SHORT_PROMPT, max_tokens=max_tokens, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0))
    run = Run(time.perf_counter())
    async for response in stub.Generate(request, timeout=600):
        kind = response.WhichOneof("event")
        if kind == "token":
            run.arrivals.append(time.perf_counter())
        elif kind == "finished":
            run.server_tps = response.finished.usage.decode_tokens_per_second
    return run.result()


async def over_sse(http: aiohttp.ClientSession, url: str, max_tokens: int) -> dict[str, float]:
    body = {"prompt": SHORT_PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    run = Run(time.perf_counter())
    async with http.post(url + "/api/generate", json=body) as resp:
        resp.raise_for_status()
        event = ""
        async for raw in resp.content:  # one line at a time
            line = raw.decode()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "token":
                run.arrivals.append(time.perf_counter())
            elif line.startswith("data:") and event == "done":
                run.server_tps = json.loads(line[5:])["usage"]["decode_tokens_per_second"]
    return run.result()


async def measure(target: str, url: str, runs: int, max_tokens: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"grpc": [], "sse": []}
    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as http:
        stub = pb_grpc.InferenceStub(channel)
        await over_grpc(stub, 16)  # loads the model, warms both paths
        await over_sse(http, url, 16)
        for i in range(runs):
            order = ["grpc", "sse"] if i % 2 == 0 else ["sse", "grpc"]
            for path in order:
                coro = over_grpc(stub, max_tokens) if path == "grpc" else over_sse(http, url, max_tokens)
                results[path].append(await coro)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--server", help="use this gRPC server instead of starting one")
    parser.add_argument("--bridge", help="use this bridge URL (with --server) instead of starting one")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        target = args.server or stack.enter_context(running_server())
        url = args.bridge or stack.enter_context(running_bridge(target))
        results = asyncio.run(measure(target, url, args.runs, args.max_tokens))
    keys = ["ttft_ms", "decode_tps", "server_decode_tps", "total_ms"]
    summary = {path: {k: median([r[k] for r in runs]) for k in keys} for path, runs in results.items()}
    g, s = summary["grpc"], summary["sse"]
    overhead = {"ttft_ms": s["ttft_ms"] - g["ttft_ms"],
                "decode_tps_pct": 100 * (s["decode_tps"] - g["decode_tps"]) / g["decode_tps"],
                "total_ms": s["total_ms"] - g["total_ms"]}
    print(f"default model, greedy, {args.max_tokens} tokens (ignore_eos), median of {args.runs}, interleaved; "
          "client-side timings")
    print(table(["path", "TTFT (ms)", "decode tok/s (client)", "decode tok/s (server)", "total (ms)"],
                [[p, summary[p]["ttft_ms"], summary[p]["decode_tps"], summary[p]["server_decode_tps"],
                  summary[p]["total_ms"]] for p in ("grpc", "sse")]))
    print(f"bridge overhead: TTFT {overhead['ttft_ms']:+.2f} ms, decode tok/s {overhead['decode_tps_pct']:+.1f}%, "
          f"total {overhead['total_ms']:+.1f} ms")
    path = write_json("bridge.json", {"runs": args.runs, "max_tokens": args.max_tokens, "prompt": SHORT_PROMPT,
                                      "median": summary, "overhead": overhead, "raw": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
