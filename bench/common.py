"""Helpers shared by the benchmarks: a server of their own, fixed prompts, medians, tables."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
# Where the JSON and the servers' logs go; TOKENWIRE_BENCH_RESULTS moves them (bench/gpu_check.sh).
RESULTS = Path(os.environ.get("TOKENWIRE_BENCH_RESULTS") or ROOT / "bench" / "results")

SHORT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# A fixed long prompt: repeated paragraphs of the evaluation text, cut to a token count.


def long_prompt(tokenizer, n_tokens: int) -> str:
    from tokenwire.server.build.quality import eval_text

    ids = tokenizer.encode(eval_text())
    return tokenizer.decode(ids[:n_tokens])


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_PIDS: dict[str, int] = {}  # target -> pid of the servers running_server started


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory in use, MB, from nvidia-smi: the process's own where the driver lists it, else
    the whole device's; None without nvidia-smi."""
    def query(what: str, fields: str) -> list[list[str]]:
        try:
            out = subprocess.run(["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    if pid is not None:
        for row in query("compute-apps", "pid,used_memory"):
            if len(row) == 2 and row[0] == str(pid) and row[1].isdigit():
                return float(row[1])
    rows = query("gpu", "memory.used")
    return float(rows[0][0]) if rows and rows[0][0].isdigit() else None


def _exit_on_sigterm() -> None:
    """A benchmark stopped by SIGTERM (`timeout` in bench/gpu_check.sh) unwinds, so the servers it
    started are stopped rather than left running; a second SIGTERM (timeout signals the process,
    then its group) does not interrupt that."""
    def leave(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, leave)
        except ValueError:  # not the main thread: leave it
            pass


@contextmanager
def running_server(*extra: str):
    """Starts `tokenwire serve` on a free port; yields its target."""
    _exit_on_sigterm()
    RESULTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(RESULTS / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tokenwire.clients.cli", "serve", "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    SERVER_PIDS[target] = proc.pid
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield target
    finally:
        SERVER_PIDS.pop(target, None)
        proc.terminate()
        proc.wait(20)


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Polls `url` until it answers; False when `proc` exits or `timeout_s` passes first."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return True
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                return False
            time.sleep(interval_s)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    data = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])
