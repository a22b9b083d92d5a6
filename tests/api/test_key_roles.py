"""Model management needs an admin key (Security issue, 7): a user's key may generate, not load,
unload, pull or delete models, nor pin one in memory with keep_alive -1."""

from __future__ import annotations

import subprocess
import time

import grpc
import pytest
from conftest import DEFAULT_INT4, cli, start_server

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def test_only_admin_keys_manage_models(models_dir, tmp_path) -> None:
    db = str(tmp_path / "roles.db")
    keys = {}
    for user, extra in (("alice", ()), ("root", ("--admin",))):
        done = subprocess.run(cli("keys", "create", user, *extra, "--database", db), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        keys[user] = (("authorization", f"Bearer {done.stdout.strip()}"),)
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0", "--keep-alive", "300")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for call in (lambda: list(stub.LoadModel(pb.LoadModelRequest(model=DEFAULT_INT4), metadata=keys["alice"],
                                                     timeout=60)),
                         lambda: stub.UnloadModel(pb.UnloadModelRequest(model=DEFAULT_INT4), metadata=keys["alice"],
                                                  timeout=60),
                         # Names nothing holds: were the check gone, these would fail otherwise, touching nothing.
                         lambda: list(stub.PullModel(pb.PullModelRequest(name="no-such-model"), metadata=keys["alice"],
                                                     timeout=60)),
                         lambda: stub.DeleteModel(pb.DeleteModelRequest(model="no-such-model"), metadata=keys["alice"],
                                                  timeout=60)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in info.value.details()
            # alice may use the model, but not pin it: her keep_alive -1 is the server's 300 s.
            list(stub.Generate(pb.GenerateRequest(model=DEFAULT_INT4, prompt="Hi", max_tokens=1, keep_alive_s=-1),
                               metadata=keys["alice"], timeout=120))
            info = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), metadata=keys["alice"],
                                                     timeout=30).models}[DEFAULT_INT4]
            assert info.state == pb.MODEL_STATE_LOADED and 0 < info.expires_unix_ms <= (time.time() + 301) * 1000
            # root may do all of it.
            events = list(stub.LoadModel(pb.LoadModelRequest(model=DEFAULT_INT4, keep_alive_s=-1),
                                         metadata=keys["root"], timeout=120))
            assert events[-1].stage == pb.LOAD_STAGE_READY and events[-1].model.expires_unix_ms == 0
            reply = stub.UnloadModel(pb.UnloadModelRequest(model=DEFAULT_INT4), metadata=keys["root"], timeout=120)
            assert reply.was_loaded
    finally:
        server.stop()
