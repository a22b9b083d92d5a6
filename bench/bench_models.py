"""Load time and resident memory of each default variant, as the model manager sees them.

Per variant, a fresh server of its own (so nothing else is in its memory):
* cold load: LoadModel on the fresh process (the files are in the page cache after the first run);
* reloads: UnloadModel + LoadModel, `--reloads` times (median);
* memory: the server's own figure (ModelInfo.memory_bytes: resident growth measured during the
  load, at least the weights, plus KV held) and, independently, the server process's VmRSS from
  /proc before the load, after it, after a 128-token generation, and after the unload.

    .venv/bin/python bench/bench_models.py [--reloads 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHORT_PROMPT, free_port, table, write_json  # noqa: E402

from tokenwire.server.models.store import ModelStore, folder_size  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

VARIANTS = ["smollm2-135m:int4", "smollm2-135m:fp32"]
MB = 1e6


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def server_process():
    port = free_port()
    log = open(RESULTS / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tokenwire.clients.cli", "serve", "--port", str(port),
                             "--metrics-port", "0", "--keep-alive", "-1"], stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            yield proc.pid, pb_grpc.InferenceStub(channel)
    finally:
        proc.terminate()
        proc.wait(20)


def load(stub, model: str) -> tuple[float, pb.ModelInfo]:
    started = time.perf_counter()
    events = list(stub.LoadModel(pb.LoadModelRequest(model=model), timeout=300))
    return time.perf_counter() - started, events[-1].model


def info_of(stub, model: str) -> pb.ModelInfo:
    return next(m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.id == model)


def measure(model: str, reloads: int) -> dict:
    with server_process() as (pid, stub):
        time.sleep(1.0)  # let the process settle
        rss_idle = rss_of(pid)
        cold_wall, info = load(stub, model)
        rss_loaded = rss_of(pid)
        cold = {"wall_s": cold_wall, "server_load_s": info.load_time_ms / 1000, "memory_bytes": info.memory_bytes}
        request = pb.GenerateRequest(model=model, prompt=SHORT_PROMPT, max_tokens=128, ignore_eos=True,
                                     sampling=pb.SamplingParams(temperature=0.0))
        for _ in stub.Generate(request, timeout=300):
            pass
        after_gen = info_of(stub, model)
        rss_generated = rss_of(pid)
        stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=120)
        rss_unloaded = rss_of(pid)
        warm_wall, warm_server, warm_memory = [], [], []
        for _ in range(reloads):
            wall, info = load(stub, model)
            warm_wall.append(wall)
            warm_server.append(info.load_time_ms / 1000)
            warm_memory.append(info.memory_bytes)
            stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=120)
    return {
        "model": model,
        "size_on_disk_bytes": folder_size(ModelStore().get(model).path),
        "cold": cold,
        "reload_wall_s_median": statistics.median(warm_wall),
        "reload_server_s_median": statistics.median(warm_server),
        "reload_memory_bytes_median": statistics.median(warm_memory),
        "reload_wall_s": warm_wall,
        "after_128_tokens": {"memory_bytes": after_gen.memory_bytes, "kv_cache_bytes": after_gen.kv_cache_bytes},
        "server_rss_bytes": {"idle": rss_idle, "loaded": rss_loaded, "after_128_tokens": rss_generated,
                             "unloaded": rss_unloaded},
    }


def measure_together(models: list[str]) -> dict:
    """Every variant loaded in one server: is the reported memory additive, and does it match RSS?"""
    with server_process() as (pid, stub):
        time.sleep(1.0)
        rss_idle = rss_of(pid)
        reported = {}
        for model in models:
            reported[model] = load(stub, model)[1].memory_bytes
        reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
        return {"memory_bytes": reported, "memory_in_use_bytes": reply.memory_in_use_bytes,
                "server_rss_growth_bytes": rss_of(pid) - rss_idle}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = [measure(model, args.reloads) for model in VARIANTS]
    rows = []
    for r in results:
        rss = r["server_rss_bytes"]
        rows.append([
            r["model"], f"{r['size_on_disk_bytes'] / MB:.0f}",
            f"{r['cold']['server_load_s']:.2f}", f"{r['reload_server_s_median']:.2f}",
            f"{r['cold']['memory_bytes'] / MB:.0f}", f"{(rss['loaded'] - rss['idle']) / MB:.0f}",
            f"{r['after_128_tokens']['kv_cache_bytes'] / MB:.1f}", f"{(rss['unloaded'] - rss['idle']) / MB:.0f}",
        ])
    print(table(["model", "disk MB", "cold load s", "reload s (median)", "memory MB (reported)",
                 "server RSS +MB", "KV MB after 128 tok", "RSS +MB after unload"], rows))
    together = measure_together(VARIANTS)
    print(f"all loaded in one server: reported {together['memory_in_use_bytes'] / MB:.0f} MB "
          f"({', '.join(f'{m} {v / MB:.0f} MB' for m, v in together['memory_bytes'].items())}); "
          f"server RSS grew {together['server_rss_growth_bytes'] / MB:.0f} MB")
    path = write_json("models.json", {"reloads": args.reloads, "results": results, "together": together})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
