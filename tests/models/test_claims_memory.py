"""The memory budget over a real server, with the memory the server itself measures (no replaced
`rss`): two models that do not fit together take turns, and sizes and durations given with units
on the command line (`400M`, `5m`) arrive as the exact values.

Both models are the default int4 model, linked into a store of their own under two ids.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest
from conftest import DEFAULT_INT4, start_server

from tokenwire.server.models.manager import LOAD_OVERHEAD
from tokenwire.server.models.store import ModelStore, weight_files
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

TWIN = "twin:int4"
BUDGET = 400 << 20  # --memory-budget-bytes 400M


def link_model(src: Path, dest: Path, model_id: str) -> None:
    """A store folder whose files are links to `src`'s, under another id."""
    dest.mkdir()
    for item in src.iterdir():
        if item.name != "tokenwire.json":
            os.symlink(item, dest / item.name)
    manifest = json.loads((src / "tokenwire.json").read_text())
    manifest["id"] = model_id
    (dest / "tokenwire.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def budget_server(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    store = tmp / "store"
    store.mkdir()
    int4 = ModelStore(models_dir).get(DEFAULT_INT4).path
    link_model(int4, store / "smollm2-135m_int4", DEFAULT_INT4)
    link_model(int4, store / "twin_int4", TWIN)
    proc = start_server(tmp, store, "--memory-budget-bytes", "400M", "--keep-alive", "5m",
                        "--max-loaded-models", "0", "--metrics-port", "0")
    with grpc.insecure_channel(proc.target) as channel:
        yield pb_grpc.InferenceStub(channel), int4
    proc.stop()


def generate(stub, model: str) -> pb.Finished:
    request = pb.GenerateRequest(model=model, prompt="Hello", max_tokens=2, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0))
    finished = [r.finished for r in stub.Generate(request, timeout=120) if r.HasField("finished")]
    return finished[0]


def listing(stub) -> tuple[dict[str, pb.ModelInfo], pb.ListModelsResponse]:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    return {m.id: m for m in reply.models}, reply


def test_units_on_the_command_line_arrive_as_exact_values(budget_server) -> None:
    stub, _ = budget_server
    _, reply = listing(stub)
    assert reply.memory_budget_bytes == BUDGET, "400M is 400 MiB"
    assert reply.max_loaded_models == 0
    assert generate(stub, DEFAULT_INT4).reason == pb.FINISH_REASON_LENGTH
    info = listing(stub)[0][DEFAULT_INT4]
    assert info.state == pb.MODEL_STATE_LOADED
    left = info.expires_unix_ms / 1000 - time.time()
    assert 290 < left < 301, f"--keep-alive 5m: the idle model expires in 300 s, not in {left:.0f} s"


def test_a_model_that_does_not_fit_beside_another_unloads_it(budget_server) -> None:
    """400 MiB holds one of them (about 236 MB measured, or 1.5 x 230 MB of weights estimated
    before a first load), never both: each use of one unloads the other."""
    stub, int4 = budget_server
    weights = sum(weight_files(int4).values())
    assert weights < BUDGET < weights + LOAD_OVERHEAD * weights, "the budget fits one model, not two"
    generate(stub, DEFAULT_INT4)
    loads = {m: info.load_count for m, info in listing(stub)[0].items()}
    for model, other in ((TWIN, DEFAULT_INT4), (DEFAULT_INT4, TWIN)):
        assert generate(stub, model).reason == pb.FINISH_REASON_LENGTH
        models, reply = listing(stub)
        assert models[model].state == pb.MODEL_STATE_LOADED
        assert models[other].state == pb.MODEL_STATE_AVAILABLE, f"{other} must have been unloaded for {model}"
        assert models[other].memory_bytes == 0
        # What the server measured: at least the weights, within the budget, and all of what is in use.
        assert weights <= models[model].memory_bytes <= BUDGET, models[model]
        assert reply.memory_in_use_bytes == models[model].memory_bytes <= BUDGET
    after = listing(stub)[0]
    assert after[TWIN].load_count == loads[TWIN] + 1
    assert after[DEFAULT_INT4].load_count == loads[DEFAULT_INT4] + 1
