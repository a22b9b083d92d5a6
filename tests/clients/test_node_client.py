"""The Node.js client (clients/node) against the live server: same models, same greedy tokens."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tokenwire.v1 import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "clients" / "node"
SCRIPT = NODE_DIR / "tokenwire.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (apt-get install nodejs npm)")


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed and clients/node/node_modules is missing")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}")
    return ["node", str(SCRIPT)]


def run_node(node_client: list[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*node_client, *args], capture_output=True, text=True, timeout=timeout)


def test_models_lists_the_same_ids_as_list_models(node_client, server, stub):
    expected = [m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models]
    assert expected, "the server lists no models"

    done = run_node(node_client, "models", "--json", "--server", server.target)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert [m["id"] for m in reply["models"]] == expected
    assert sum(m["is_default"] for m in reply["models"]) == 1

    table = run_node(node_client, "models", "--server", server.target)
    assert table.returncode == 0, table.stderr
    for model_id in expected:
        assert model_id in table.stdout


@pytest.mark.parametrize("chat", [False, True], ids=["prompt", "chat"])
def test_greedy_tokens_match_the_python_client(node_client, server, stub, chat):
    text = "The three primary colors are"
    request = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0.0), max_tokens=24)
    if chat:
        request.messages.append(pb.ChatMessage(role="user", content=text))
    else:
        request.prompt = text
    python_tokens = []
    python_text = ""
    for response in stub.Generate(request, timeout=120):
        if response.WhichOneof("event") == "token":
            python_tokens.append(response.token.token_id)
            python_text += response.token.text
    assert len(python_tokens) > 0

    args = ["generate", text, "--temperature", "0", "--max-tokens", "24", "--json", "--server", server.target]
    done = run_node(node_client, *args, *(["--chat"] if chat else []))
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    tokens = [e["token"] for e in events if "token" in e]
    assert [t["token_id"] for t in tokens] == python_tokens
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == python_text
    assert "finished" in events[-1]
    finished = events[-1]["finished"]
    assert finished["reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    assert finished["usage"]["completion_tokens"] == len(python_tokens)

    # Plain mode streams the same text to stdout.
    plain = run_node(node_client, *[a for a in args if a != "--json"], *(["--chat"] if chat else []))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == python_text + "\n"


def test_errors_are_one_line_and_non_zero(node_client, server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    down = run_node(node_client, "models", "--server", f"127.0.0.1:{closed_port}")
    assert down.returncode != 0
    assert "cannot reach the tokenwire server" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1

    bad = run_node(node_client, "generate", "hi", "--max-tokens", "lots", "--server", server.target)
    assert bad.returncode == 2
    assert "--max-tokens" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    unknown = run_node(node_client, "generate", "hi", "--model", "no-such-model", "--server", server.target)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
