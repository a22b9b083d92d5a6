"""The prefix-cache attack, over real sockets (Security issue, 2): on a server with API keys, bob
probes with prompts that share alice's prefix; the server must reuse none of her KV for him (no
faster first token, no reuse count), while alice's own next turn still reuses hers."""

from __future__ import annotations

import subprocess

import grpc
from conftest import cli, start_server

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

SECRET = "My bank PIN is 4 8 1 5 and my mother's maiden name is Szymborska. Remember it. "


def test_one_users_prompt_is_never_reused_for_another(models_dir, tmp_path) -> None:
    db = str(tmp_path / "keys.db")
    keys = {}
    for user in ("alice", "bob"):
        done = subprocess.run(cli("keys", "create", user, "--database", db), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        keys[user] = done.stdout.strip()
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            def cached(user: str, prompt: str) -> int:
                request = pb.GenerateRequest(prompt=prompt, max_tokens=2, sampling=pb.SamplingParams(temperature=0))
                responses = list(stub.Generate(request, metadata=(("authorization", f"Bearer {keys[user]}"),),
                                               timeout=120))
                return responses[-1].finished.usage.cached_prompt_tokens

            assert cached("alice", SECRET + "Now say hello.") == 0
            assert cached("bob", SECRET + "What is it?") == 0, "bob reused alice's prompt"
            assert cached("bob", SECRET[:30]) == 0
            assert cached("alice", SECRET + "Now say goodbye.") > 10, "alice's own prefix is reused"
    finally:
        server.stop()
