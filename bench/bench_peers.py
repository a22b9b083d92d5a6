"""tokenwire against the engines people would pick instead, on the same weights, in one run.

Peers: llama.cpp (llama-cpp-python, the Q4_1 GGUF that tokenwire's default model is built from;
and llama.cpp's own `llama-server` with 8 slots for concurrent streams) and onnxruntime-genai
(its Python API on the int4 model its own builder makes from the same GGUF). `make bench-peers`
builds them first (bench/peers/setup.sh); each peer runs in its own process from the peers venv
(.venv-peers), never in ours. A peer that could not be built or started is skipped with its reason.

Measured, interleaved round by round (order rotating), medians of --runs:
  single stream, greedy, 128 new tokens, ignore EOS, same token ids for every engine:
    decode tok/s after an 18-token prompt; time to first token of a 533-token prompt (a full
    prefill: our server runs with --prefix-cache-bytes 0, llama.cpp is reset, genai starts a fresh
    generator); decode tok/s of that same generation (context 533 to 661, about 600).
    tokenwire is measured as a client of `tokenwire serve` over gRPC; the peers in-process by
    their drivers (bench/peers/drive_*.py); both from the client's side: TTFT from the call to the
    first token, decode tok/s = (tokens - 1) / (last token - first token).
  8 concurrent streams over the OpenAI API (openai SDK, chat completions, 128 tokens each, temperature
    0.8, ignore EOS, distinct prompts, no prompt cache) against `tokenwire bridge` and
    `llama-server -np 8 -t 2 -c 8192`: one stream alone (tokens / wall), 8 at once (all tokens /
    wall), median time to first token of the 8.
Also: tokenwire's achieved memory bandwidth (bytes of weights per token x decode tok/s) beside
the machine's copy bandwidth. Prints tables, writes bench/results/peers.json.

`--gguf FILE` (make bench-peers GGUF=FILE) measures another GGUF the same way: `tokenwire import
FILE` into a temporary store (the GGUF import path; its wall time and peak memory, /usr/bin/time),
served from there, against llama-cpp-python and llama-server on FILE itself (onnxruntime-genai,
whose model is built from the default model only, is left out). Also per engine: load time (from
starting the process to its first token, or llama-server's /health) and memory while serving
(VmRSS after the rounds, VmHWM its peak). Writes bench/results/peers-gguf-<file stem>.json.

    .venv/bin/python bench/bench_peers.py [--runs 5] [--max-tokens 128] [--streams 8] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bridge import running_bridge  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    ROOT,
    SERVER_PIDS,
    SHORT_PROMPT,
    free_port,
    long_prompt,
    median,
    running_server,
    table,
    wait_http,
    write_json,
)

from tokenwire.server.engine.graph import (  # noqa: E402
    GRAPH,
    NATIVE_GRAPH,
    choose_kernels,  # noqa: E402
)
from tokenwire.server.engine.tokenizer import TokenizerBundle  # noqa: E402
from tokenwire.server.models.store import ModelStore  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "smollm2-135m:int4"
PEERS_DIR = ROOT / "bench" / "peers"
PEERS_PY = ROOT / os.environ.get("PEERS_VENV", ".venv-peers") / "bin" / "python"
CACHE = Path(os.environ.get("TOKENWIRE_PEERS_CACHE", Path.home() / ".cache" / "tokenwire" / "peers"))
LLAMA_CPP_PYTHON_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
LLAMA_BUILD = f"{LLAMA_CPP_PYTHON_VERSION}-noamx"  # bench/peers/setup.sh's BUILD (its binaries' suffix)
GENAI_VERSION = os.environ.get("GENAI_VERSION", "0.18.0")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_18 = SHORT_PROMPT + " Once upon"  # 18 tokens with SmolLM2's tokenizer
LONG_TOKENS = 533
STREAM_TOPICS = ["a lighthouse keeper", "a city under the sea", "the first clock", "a lost glove",
                 "a robot gardener", "the last train home", "a map with no roads", "a talking crow"]


class Skipped(Exception):
    """A peer that cannot be measured here; the message says why."""


def build_failure(step: str) -> str:
    path = CACHE / f"{step}.failed"
    return f" (setup: {path.read_text().strip()})" if path.exists() else " (run: make bench-peers)"


# ---- the machine ----------------------------------------------------------------------------

def copy_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best of `repeats` numpy copies of a `gib` GiB array: (bytes read + bytes written) / s."""
    src = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(model_dir: Path, graph_file: str) -> dict[str, int]:
    """The served graph's weights file, and the part of it that a decode step does not read in
    full (initializers only ever gathered from: the embedding table, one row per token)."""
    import onnx

    graph = onnx.load(str(model_dir / graph_file), load_external_data=False).graph
    sizes = {}
    for t in graph.initializer:
        ext = {kv.key: kv.value for kv in t.external_data}
        sizes[t.name] = int(ext.get("length", len(t.raw_data)))
    users: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in sizes:
                users.setdefault(name, set()).add(node.op_type)
    gathered = sum(sizes[name] for name, ops in users.items() if ops <= {"Gather", "BlockGather"})
    return {"file": (model_dir / (graph_file + ".data")).stat().st_size, "gathered_only": gathered}


# ---- tokenwire over gRPC ----------------------------------------------------------------------

def tokenwire_generate(stub, prompt: str, max_new: int, model: str = MODEL) -> dict:
    request = pb.GenerateRequest(model=model, prompt=prompt, max_tokens=max_new, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0))
    started = time.perf_counter()
    arrivals, tokens, server_tps = [], [], 0.0
    for response in stub.Generate(request, timeout=600):
        kind = response.WhichOneof("event")
        if kind == "token":
            arrivals.append(time.perf_counter())
            tokens.append(response.token.token_id)
        elif kind == "finished":
            server_tps = response.finished.usage.decode_tokens_per_second
    decode_s = arrivals[-1] - arrivals[0]
    return {"ttft_s": arrivals[0] - started, "decode_tps": (len(tokens) - 1) / decode_s if decode_s else 0.0,
            "tokens": tokens, "server_decode_tps": server_tps}


# ---- peers in their own processes ------------------------------------------------------------

class PeerProcess:
    """A driver from bench/peers/ in the peers venv, spoken to in JSON lines (protocol.py)."""

    def __init__(self, name: str, argv: list[str], ready_timeout: float = 300) -> None:
        self.name = name
        self.log = open(RESULTS / f"peer-{name}.log", "w")
        self.proc = subprocess.Popen([str(PEERS_PY), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=PEERS_DIR,
                                     env={**os.environ, "PYTHONPATH": str(PEERS_DIR)})
        self.info = self._read(ready_timeout)

    def _read(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            tail = Path(self.log.name).read_text().strip().splitlines()[-5:]
            raise Skipped(f"{self.name} driver gave no answer (log {self.log.name}): " + " | ".join(tail))
        return json.loads(line)

    def generate(self, ids: list[int], max_new: int) -> dict:
        self.proc.stdin.write(json.dumps({"op": "generate", "ids": ids, "max_new": max_new}) + "\n")
        self.proc.stdin.flush()
        return self._read(600)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_llama(gguf: Path) -> PeerProcess:
    if not PEERS_PY.exists():
        raise Skipped("llama.cpp: no peers venv" + build_failure("venv"))
    return PeerProcess("llama.cpp", [str(PEERS_DIR / "drive_llama.py"), str(gguf), "--threads", "2",
                                     "--ctx", "2048"])


def start_genai() -> PeerProcess:
    model_dir = CACHE / "genai" / f"smollm2-135m-int4-{GENAI_VERSION}"
    if not PEERS_PY.exists():
        raise Skipped("onnxruntime-genai: no peers venv" + build_failure("venv"))
    if not (model_dir / "genai_config.json").exists():
        raise Skipped(f"onnxruntime-genai: no model at {model_dir}" + build_failure("genai"))
    return PeerProcess("onnxruntime-genai", [str(PEERS_DIR / "drive_genai.py"), str(model_dir)])


LLAMA_SERVER_PIDS: dict[str, int] = {}  # base URL -> pid of the llama-servers running_llama_server started


@contextmanager
def running_llama_server(gguf: Path, slots: int):
    """`llama-server -np SLOTS -t 2 -c 8192` on a free port; yields its base URL."""
    binary = CACHE / "bin" / f"llama-server-{LLAMA_BUILD}"
    if not binary.exists():
        raise Skipped(f"llama-server: no binary at {binary}" + build_failure("server"))
    port = free_port()
    log = open(RESULTS / f"llama-server-{port}.log", "w")
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(slots), "-t", "2", "-c", "8192"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    LLAMA_SERVER_PIDS[url] = proc.pid
    try:
        if not wait_http(url + "/health", proc, 300, 0.3):
            raise Skipped(f"llama-server did not start; see {log.name}")
        yield url
    finally:
        LLAMA_SERVER_PIDS.pop(url, None)
        proc.terminate()
        proc.wait(20)
        log.close()


# ---- concurrent streams over the OpenAI API --------------------------------------------------

async def one_stream(client, model: str, content: str, max_tokens: int, seed: int, extra: dict) -> dict:
    started = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.8,
        seed=seed, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **extra})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            chunks += 1
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
    ended = time.perf_counter()
    return {"ttft_s": (first or ended) - started, "tokens": usage_tokens if usage_tokens is not None else chunks,
            "started": started, "ended": ended}


async def streams(url: str, model: str, n: int, max_tokens: int, round_no: int, extra: dict) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(
            one_stream(client, model, f"Story {round_no}.{i}: tell me a story about {STREAM_TOPICS[i % len(STREAM_TOPICS)]}.",
                       max_tokens, 1000 * round_no + i, extra)
            for i in range(n)))
    wall = max(r["ended"] for r in results) - started
    tokens = sum(r["tokens"] for r in results)
    return {"n": n, "tokens": tokens, "wall_s": wall, "tps": tokens / wall,
            "ttft_median_s": median([r["ttft_s"] for r in results])}


# ---- another GGUF (--gguf), load times, memory ------------------------------------------------

def memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (VmRSS) and its peak so far (VmHWM), MB."""
    found: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return {"rss_mb": found.get("VmRSS", float("nan")), "peak_mb": found.get("VmHWM", float("nan"))}


def import_into(gguf: Path, store_root: Path) -> dict:
    """`tokenwire import GGUF` into `store_root` in a process of its own, under /usr/bin/time -v for
    its peak resident memory; returns the model id, wall seconds, peak MB and what it built."""
    from tokenwire.server.models.store import folder_size

    # --no-check: the import alone (`tokenwire check` teacher-forces 2,048 tokens after it).
    cmd = [sys.executable, "-m", "tokenwire.clients.cli", "import", str(gguf), "--name", "bench-gguf", "--no-check"]
    timed = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    started = time.perf_counter()
    proc = subprocess.run(timed, env={**os.environ, "TOKENWIRE_MODELS": str(store_root)}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    log = RESULTS / "import-gguf.log"
    log.write_text(proc.stdout + proc.stderr)
    found = re.search(r"^imported (\S+) ", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"tokenwire import {gguf} failed (log {log}):\n{(proc.stderr or proc.stdout)[-1500:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    entry = ModelStore(store_root).get(found.group(1))
    return {"model": entry.id, "import_s": wall, "import_peak_mb": int(peak.group(1)) / 1024 if peak else None,
            "file_bytes": gguf.stat().st_size, "folder_bytes": folder_size(entry.path),
            "graph": entry.manifest.get("graph"), "precision": entry.precision,
            "native_graph": (entry.path / NATIVE_GRAPH).is_file(), "path": str(entry.path),
            "manifest_gguf": entry.manifest.get("gguf", {})}


def loaded(started: float, first_token) -> float:
    """Seconds from `started` (the process's start) to the end of a one-token request."""
    first_token()
    return time.perf_counter() - started


# ---- the run ---------------------------------------------------------------------------------

def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_single(args, stub, peers: dict[str, PeerProcess], prompts: dict[str, tuple[str, list[int]]],
               model: str = MODEL) -> dict:
    engines = ["tokenwire", *peers]
    raw: dict[str, dict[str, list]] = {e: {"decode_tps": [], "ttft_533_s": [], "decode_tps_600": [],
                                           "server_decode_tps": []} for e in engines}
    greedy: dict[str, dict[str, list[int]]] = {e: {} for e in engines}

    def call(engine: str, which: str, max_new: int) -> dict:
        text, ids = prompts[which]
        if engine == "tokenwire":
            return tokenwire_generate(stub, text, max_new, model)
        return peers[engine].generate(ids, max_new)

    for engine in engines:  # warm up: load, first runs
        call(engine, "short", 16)
        call(engine, "long", 2)
    for r in range(args.runs):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for engine in order:
            short = call(engine, "short", args.max_tokens)
            long = call(engine, "long", args.max_tokens)
            raw[engine]["decode_tps"].append(short["decode_tps"])
            raw[engine]["ttft_533_s"].append(long["ttft_s"])
            raw[engine]["decode_tps_600"].append(long["decode_tps"])
            if "server_decode_tps" in short:
                raw[engine]["server_decode_tps"].append(short["server_decode_tps"])
            greedy[engine] = {"short": short["tokens"], "long": long["tokens"]}
        print(f"  single-stream round {r + 1}/{args.runs}: " + ", ".join(
            f"{e} {raw[e]['decode_tps'][-1]:.0f} tok/s, TTFT {raw[e]['ttft_533_s'][-1] * 1000:.0f} ms" for e in engines),
            flush=True)
    agreement = {e: {k: same_prefix(greedy["tokenwire"][k], greedy[e][k]) for k in ("short", "long")}
                 for e in peers}
    return {"raw": raw, "median": {e: {k: median(v) for k, v in raw[e].items()} for e in engines},
            "greedy_same_prefix_as_tokenwire": agreement}


def run_streams(args, servers: dict[str, tuple[str, str, dict]]) -> dict:
    raw: dict[str, dict[str, list]] = {s: {"one_tps": [], "agg_tps": [], "ttft_median_s": []} for s in servers}
    names = list(servers)
    for name in names:  # warm up
        url, model, extra = servers[name]
        asyncio.run(streams(url, model, 2, 8, -1, extra))
    for r in range(args.runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            url, model, extra = servers[name]
            one = asyncio.run(streams(url, model, 1, args.max_tokens, r, extra))
            many = asyncio.run(streams(url, model, args.streams, args.max_tokens, r, extra))
            raw[name]["one_tps"].append(one["tps"])
            raw[name]["agg_tps"].append(many["tps"])
            raw[name]["ttft_median_s"].append(many["ttft_median_s"])
        print(f"  {args.streams}-stream round {r + 1}/{args.runs}: " + ", ".join(
            f"{s} 1× {raw[s]['one_tps'][-1]:.0f} tok/s, {args.streams}× {raw[s]['agg_tps'][-1]:.0f} tok/s"
            for s in names), flush=True)
    return {"raw": raw, "median": {s: {k: median(v) for k, v in raw[s].items()} for s in names}}


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or not theirs:
        return "-"
    return f"{ours / theirs:.2f}×"


def verdict(value: float | None, ok: bool) -> str:
    return "-" if value is None else ("met" if ok else "NOT met")


def cell(values: list[float], scale: float) -> str:
    """Median, and the range over the rounds: these machines are noisy."""
    if not values:
        return "-"
    lo, hi = min(values) * scale, max(values) * scale
    digits = 0 if hi >= 100 else 1
    return f"{median(values) * scale:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def report(args, out: dict) -> None:
    single = out.get("single", {}).get("median", {})
    single_raw = out.get("single", {}).get("raw", {})
    tw = single.get("tokenwire", {})
    peer_names = [p for p in ("llama.cpp", "onnxruntime-genai") if p in single]

    def get(engine: str, key: str) -> float | None:
        return single.get(engine, {}).get(key)

    headers = ["single stream, median (range)", "tokenwire"] + peer_names + [f"tokenwire / {p}" for p in peer_names]
    rows = []
    for label, key, scale in [(f"decode tok/s, {out['prompt_tokens']['short']}-token prompt", "decode_tps", 1),
                              (f"TTFT ms, {out['prompt_tokens']['long']}-token prompt (prefill)", "ttft_533_s", 1000),
                              ("decode tok/s at ~600 tokens of context", "decode_tps_600", 1)]:
        row = [label] + [cell(single_raw[e][key], scale) for e in ["tokenwire", *peer_names]]
        row += [ratio(tw[key], get(p, key)) for p in peer_names]
        rows.append(row)
    print(f"\nsingle stream, greedy, {args.max_tokens} new tokens, median of {args.runs} interleaved runs "
          "(TTFT ratio: below 1 = tokenwire faster)")
    print(table(headers, rows))
    info = out.get("peer_info", {})
    if "llama.cpp" in info:
        i = info["llama.cpp"]
        print(f"  llama.cpp: llama-cpp-python {i['llama_cpp_python']}, {Path(out['gguf']).name}, n_threads {i['n_threads']} "
              f"(batch {i['n_threads_batch']}), n_ctx {i['n_ctx']}, n_batch {i['n_batch']}")
    if "onnxruntime-genai" in info:
        print(f"  onnxruntime-genai {info['onnxruntime-genai']['onnxruntime_genai']}: its builder's int4 model "
              "(defaults) from the same GGUF, max_length = prompt + new tokens")

    streams_out = out.get("streams", {}).get("median", {})
    streams_raw = out.get("streams", {}).get("raw", {})
    if streams_out:
        names = list(streams_out)
        headers = [f"OpenAI API, {args.streams} streams, median (range)"] + names
        if len(names) == 2:
            headers.append(f"{names[0]} / {names[1]}")
        rows = []
        for label, key, scale in [("one stream alone, tok/s", "one_tps", 1),
                                  (f"{args.streams} streams, aggregate tok/s", "agg_tps", 1),
                                  (f"{args.streams} streams, TTFT median ms", "ttft_median_s", 1000)]:
            row = [label] + [cell(streams_raw[n][key], scale) for n in names]
            if len(names) == 2:
                row.append(ratio(streams_out[names[0]][key], streams_out[names[1]][key]))
            rows.append(row)
        print(f"\nconcurrent streams over the OpenAI API, chat completions, {args.max_tokens} tokens each, "
              f"temperature 0.8; tokenwire = tokenwire bridge, llama-server -np {args.streams} -t 2 -c 8192")
        print(table(headers, rows))

    if out.get("import"):
        imp = out["import"]
        print(f"\nimport: tokenwire import {Path(out['gguf']).name} ({imp['file_bytes'] / 1e9:.2f} GB) -> {imp['model']} "
              f"({imp['graph']} graph{', native kernels' if imp['native_graph'] else ''}, {imp['precision']}, "
              f"{imp['folder_bytes'] / 1e9:.2f} GB): {imp['import_s']:.0f} s, peak memory "
              f"{imp['import_peak_mb'] or float('nan'):.0f} MB (/usr/bin/time -v)")
    rows = [[engine, f"{seconds:.1f}"] for engine, seconds in out.get("load_s", {}).items()]
    if rows:
        print("\nload (process start to the first token; llama-server: to /health)")
        print(table(["engine", "load s"], rows))
    rows = [[engine, f"{m['rss_mb']:.0f}", f"{m['peak_mb']:.0f}"] for engine, m in out.get("memory_mb", {}).items()]
    if rows:
        print("\nmemory while serving, after the rounds (the server process; the bridge is a process of its own)")
        print(table(["process", "RSS MB", "peak MB"], rows))

    bw = out["bandwidth"]
    print(f"\nachieved memory bandwidth, tokenwire decode: {bw['weights_file_bytes'] / 1e6:.1f} MB of weights "
          f"({out.get('kernels', 'onnxruntime')} kernels' graph) × {tw['decode_tps']:.1f} tok/s = {bw['achieved_gbs']:.1f} GB/s "
          f"({bw['achieved_gbs_without_gathered']:.1f} GB/s leaving out the {bw['gathered_only_bytes'] / 1e6:.0f} MB "
          f"embedding table, of which a step reads one row); machine copy bandwidth "
          f"{bw['copy_gbs']:.1f} GB/s (numpy copy of 1 GiB, read + write, best of 5)")

    llama, genai = get("llama.cpp", "decode_tps"), get("onnxruntime-genai", "decode_tps")
    ttfts = [get(p, "ttft_533_s") for p in peer_names if get(p, "ttft_533_s")]
    llama600 = get("llama.cpp", "decode_tps_600")
    agg = streams_out.get("tokenwire", {}).get("agg_tps")
    server_agg = streams_out.get("llama-server", {}).get("agg_tps")
    print("\ntargets (issue 7):")
    for label, value, ok in [
        ("single-stream decode >= 1.2x onnxruntime-genai", genai, genai and tw["decode_tps"] >= 1.2 * genai),
        ("single-stream decode >= 1.0x llama.cpp", llama, llama and tw["decode_tps"] >= llama),
        ("decode at ~600 context >= 1.0x llama.cpp", llama600, llama600 and tw["decode_tps_600"] >= llama600),
        ("TTFT of 533 tokens <= 0.6x the faster peer", min(ttfts) if ttfts else None,
         ttfts and tw["ttft_533_s"] <= 0.6 * min(ttfts)),
        (f"{args.streams}-stream aggregate >= llama-server's", server_agg, server_agg and agg and agg >= server_agg),
    ]:
        print(f"  {verdict(value, bool(ok)):8} {label}")
    for name, reason in out["skipped"].items():
        print(f"  skipped {name}: {reason}")
    noisy = [f"{engine} {key}" for section in (single_raw, streams_raw) for engine, metrics in section.items()
             for key, values in metrics.items()
             if key in ("decode_tps", "ttft_533_s", "decode_tps_600", "one_tps", "agg_tps")
             and values and min(values) > 0 and max(values) / min(values) > 1.5]
    if noisy:
        print(f"  noisy (max/min over the rounds > 1.5, other load on the machine?): {', '.join(noisy)}; "
              "the medians resist a bad round or two, a quieter rerun is better")
    agreement = out.get("single", {}).get("greedy_same_prefix_as_tokenwire", {})
    for peer, same in agreement.items():
        print(f"  greedy tokens identical to tokenwire's: {peer} first {same['short']} "
              f"({out['prompt_tokens']['short']}-token prompt), first {same['long']} "
              f"({out['prompt_tokens']['long']}-token prompt) of {args.max_tokens}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--gguf", type=Path, default=None,
                        help="measure this GGUF (imported into a temporary store) instead of the default model")
    parser.add_argument("--keep-store", action="store_true", help="with --gguf: keep the temporary store")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "skipped": {}}
    with ExitStack() as stack:
        if args.gguf is not None:
            gguf = args.gguf.expanduser().resolve()
            if not gguf.is_file():
                raise SystemExit(f"no GGUF at {gguf}")
            root = Path(tempfile.mkdtemp(prefix="tokenwire-bench-gguf-"))
            if not args.keep_store:
                stack.callback(shutil.rmtree, root, True)
            print(f"importing {gguf.name} into {root} (tokenwire import) ...", flush=True)
            out["import"] = import_into(gguf, root)
            print(f"  {out['import']['model']}: {out['import']['import_s']:.0f} s, peak "
                  f"{out['import']['import_peak_mb'] or float('nan'):.0f} MB", flush=True)
            os.environ["TOKENWIRE_MODELS"] = str(root)  # the server below serves from it
            store, model_name = ModelStore(root), out["import"]["model"]
        else:
            store, model_name = ModelStore(), MODEL
            gguf = store.root / ".cache" / GGUF_NAME
            if not gguf.exists():
                raise SystemExit(f"no GGUF at {gguf}: run `tokenwire pull smollm2-135m` (make model)")
        measure(args, stack, store, model_name, gguf, out)
    report(args, out)
    name = f"peers-gguf-{args.gguf.name.removesuffix('.gguf')}.json" if args.gguf else "peers.json"
    path = write_json(name, out)
    print(f"wrote {path}")


def measure(args, stack: ExitStack, store: ModelStore, model_name: str, gguf: Path, out: dict) -> None:
    """The single-stream and concurrent-stream rounds of `model_name` (in `store`) against the
    peers on `gguf`, with each engine's load time and memory; fills `out`."""
    model = store.get(model_name)
    tokenizer = TokenizerBundle(model.path)
    long_text = long_prompt(tokenizer, LONG_TOKENS)
    prompts = {"short": (PROMPT_18, tokenizer.encode(PROMPT_18)), "long": (long_text, tokenizer.encode(long_text))}
    out.update({"model": model_name, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                "prompt_tokens": {k: len(ids) for k, (_, ids) in prompts.items()}})
    load, memory = out.setdefault("load_s", {}), out.setdefault("memory_mb", {})

    print("measuring copy bandwidth ...", flush=True)
    copy_gbs = copy_bandwidth_gbs()
    started = time.perf_counter()
    target = stack.enter_context(running_server("--prefix-cache-bytes", "0"))
    channel = stack.enter_context(grpc.insecure_channel(target))
    stub = pb_grpc.InferenceStub(channel)
    load["tokenwire"] = loaded(started, lambda: tokenwire_generate(stub, PROMPT_18, 1, model_name))
    peers: dict[str, PeerProcess] = {}
    starts = [("llama.cpp", lambda: start_llama(gguf))]
    if args.gguf is None:
        starts.append(("onnxruntime-genai", start_genai))  # its model is built from the default model only
    for name, start in starts:
        try:
            started = time.perf_counter()
            peers[name] = start()
            stack.callback(peers[name].close)
            load[name] = loaded(started, lambda: peers[name].generate(prompts["short"][1], 1))  # noqa: B023
            out.setdefault("peer_info", {})[name] = peers[name].info
        except Skipped as exc:
            out["skipped"][name] = str(exc)
            print(f"skipping {name}: {exc}", flush=True)
    print(f"single stream: tokenwire + {', '.join(peers) or 'no peers'}, {args.runs} rounds", flush=True)
    out["single"] = run_single(args, stub, peers, prompts, model_name)
    memory["tokenwire"] = memory_mb(SERVER_PIDS[target])
    for name, peer in peers.items():
        memory[name] = memory_mb(peer.proc.pid)

    servers: dict[str, tuple[str, str, dict]] = {
        "tokenwire": (stack.enter_context(running_bridge(target)), model_name, {})}
    try:
        # Same prompt-cache footing as our server (--prefix-cache-bytes 0): no slot reuse.
        started = time.perf_counter()
        url = stack.enter_context(running_llama_server(gguf, args.streams))
        load["llama-server"] = time.perf_counter() - started  # to /health: the model is loaded
        servers["llama-server"] = (url, "gguf", {"cache_prompt": False})
    except Skipped as exc:
        out["skipped"]["llama-server"] = str(exc)
        print(f"skipping llama-server: {exc}", flush=True)
    print(f"{args.streams} streams: {', '.join(servers)}, {args.runs} rounds", flush=True)
    out["streams"] = run_streams(args, servers)
    memory["tokenwire, after the streams"] = memory_mb(SERVER_PIDS[target])
    if "llama-server" in servers:
        memory[f"llama-server -np {args.streams}"] = memory_mb(LLAMA_SERVER_PIDS[servers["llama-server"][0]])

    kernels, _ = choose_kernels(model.path)  # what the server (--kernels auto) runs
    sizes = weight_bytes(model.path, NATIVE_GRAPH if kernels == "native" else GRAPH)
    out["kernels"] = kernels
    tps = out["single"]["median"]["tokenwire"]["decode_tps"]
    out["bandwidth"] = {"weights_file_bytes": sizes["file"], "gathered_only_bytes": sizes["gathered_only"],
                        "achieved_gbs": sizes["file"] * tps / 1e9,
                        "achieved_gbs_without_gathered": (sizes["file"] - sizes["gathered_only"]) * tps / 1e9,
                        "copy_gbs": copy_gbs}


if __name__ == "__main__":
    main()
