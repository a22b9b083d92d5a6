"""The drivers' side of the line protocol bench/bench_peers.py speaks to a peer process.

The driver loads its engine once, prints {"ready": true, ...} and then answers one JSON line per
request line: {"op": "generate", "ids": [...], "max_new": N} gives back the client-side timings
(seconds from the call to the first token, decode tokens/s over the rest) and the token ids.
Only the protocol writes to the real stdout; anything the engine prints goes to stderr.
Standard library only: it runs in the peers venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator


def serve(info: dict, generate: Callable[[list[int], int], Iterator[int]]) -> None:
    """Runs the request loop; `generate(ids, max_new)` yields greedy token ids, prefill included."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # engines that print to stdout cannot corrupt the protocol
    out.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        ids, max_new = list(request["ids"]), int(request["max_new"])
        started = time.perf_counter()
        arrivals, tokens = [], []
        for token in generate(ids, max_new):
            arrivals.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == max_new:
                break
        decode_s = arrivals[-1] - arrivals[0]
        out.write(json.dumps({
            "ttft_s": arrivals[0] - started,
            "decode_tps": (len(tokens) - 1) / decode_s if decode_s > 0 else 0.0,
            "tokens": tokens,
        }) + "\n")
