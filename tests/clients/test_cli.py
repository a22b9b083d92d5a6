"""The `tokenwire` command as a user runs it: real processes, real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEFAULT_INT4, cli, free_port, stop_spanning_tokens

from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.v1 import inference_pb2 as pb


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), input=stdin, capture_output=True, text=True, timeout=timeout)


def grpc_pieces(stub, sampling: pb.SamplingParams | None = None, **kwargs) -> list[str]:
    request = pb.GenerateRequest(sampling=sampling or pb.SamplingParams(temperature=0.0), **kwargs)
    return [r.token.text for r in stub.Generate(request, timeout=120) if r.WhichOneof("event") == "token"]


def grpc_greedy_text(stub, **kwargs) -> str:
    return "".join(grpc_pieces(stub, **kwargs))


def test_generate_streams_to_stdout_as_tokens_arrive(server, stub) -> None:
    proc = subprocess.Popen(
        cli("generate", "--server", server.target, "-t", "0", "-n", "48", "Once upon a time"),
        stdout=subprocess.PIPE, text=False,
    )
    arrivals, chunks = [], []
    while True:
        chunk = os.read(proc.stdout.fileno(), 64)
        if not chunk:
            break
        arrivals.append(time.perf_counter())
        chunks.append(chunk)
    assert proc.wait(30) == 0
    assert len(chunks) >= 5, "output should arrive in many pieces, not all at the end"
    assert arrivals[-1] - arrivals[0] > 0.2
    text = b"".join(chunks).decode()
    assert text == grpc_greedy_text(stub, prompt="Once upon a time", max_tokens=48) + "\n"


def test_generate_json_events_and_stdin_prompt(server) -> None:
    result = run("generate", "--server", server.target, "--json", "-t", "0", "-n", "5", "-", stdin="The sky is")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    tokens = [e["token"] for e in events if "token" in e]
    assert len(tokens) == 5 and all("token_id" in t for t in tokens)
    assert events[-1]["finished"]["reason"] == "FINISH_REASON_LENGTH"
    assert events[-1]["finished"]["usage"]["completion_tokens"] == 5


def test_generate_chat_and_system_use_the_template(server, stub) -> None:
    question = "What is the capital of France?"
    result = run("generate", "--server", server.target, "-t", "0", "-n", "20", "--chat", question)
    assert result.returncode == 0, result.stderr
    assert result.stdout == grpc_greedy_text(stub, max_tokens=20, messages=[pb.ChatMessage(role="user", content=question)]) + "\n"
    system = "Answer in French."
    with_system = run("generate", "--server", server.target, "-t", "0", "-n", "20", "--system", system, question)
    assert with_system.returncode == 0, with_system.stderr
    expected = grpc_greedy_text(stub, max_tokens=20, messages=[pb.ChatMessage(role="system", content=system),
                                                               pb.ChatMessage(role="user", content=question)])
    assert with_system.stdout == expected + "\n" != result.stdout


# Seeded sampling; each value changes the tokens (checked below), so a flag lost on the way shows.
SAMPLING = {"temperature": 1.0, "seed": 7}
FLAGS = {"top_p": 0.5, "top_k": 3, "min_p": 0.2, "repetition_penalty": 1.5}
PROMPT = "Tell me about the moon."


def test_sampling_flags_reach_the_server(server, stub) -> None:
    def over_grpc(**extra) -> str:
        return "".join(grpc_pieces(stub, pb.SamplingParams(**SAMPLING, **extra), prompt=PROMPT, max_tokens=12))

    expected = {name: over_grpc(**{name: value}) for name, value in FLAGS.items()}
    default = over_grpc()
    assert len({default, *expected.values()}) == len(FLAGS) + 1, "every value must change the tokens"
    base = ["generate", "--server", server.target, "-n", "12", "--temperature", "1.0", "--seed", "7"]
    for name, value in FLAGS.items():
        result = run(*base, f"--{name.replace('_', '-')}", str(value), PROMPT)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected[name] + "\n", name


def test_stop_flag_reaches_the_server(server, stub, int4_dir: Path) -> None:
    pieces = grpc_pieces(stub, prompt="Once upon a time", max_tokens=24)
    stop, at = stop_spanning_tokens(pieces)
    assert len(TokenizerBundle(int4_dir).encode(stop)) >= 2, f"{stop!r} must span tokens"
    stopped = run("generate", "--server", server.target, "-t", "0", "-n", "24", "--stop", "zzz-never", "--stop", stop,
                  "Once upon a time")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == "".join(pieces)[:at] + "\n"


def test_models_lists_the_store(server) -> None:
    result = run("models", "--server", server.target)
    assert result.returncode == 0
    assert DEFAULT_INT4 in result.stdout and "(default)" in result.stdout
    listed = json.loads(run("models", "--server", server.target, "--json").stdout)
    assert DEFAULT_INT4 in {m["id"] for m in listed["models"]}


def test_errors_are_one_clear_line() -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = run("generate", "--server", dead, "hello")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "cannot reach the tokenwire server" in result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot reach" in run("models", "--server", dead).stderr
    bad = run("generate", "--max-tokens", "0", "hello")
    assert bad.returncode == 2 and "--max-tokens must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


def test_server_errors_are_one_line_too(server) -> None:
    result = run("generate", "--server", server.target, "--model", "nope", "hi")
    assert result.returncode == 1 and result.stderr.startswith("tokenwire: NOT_FOUND: unknown model 'nope'")
    result = run("generate", "--server", server.target, "--temperature", "-1", "hi")
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "temperature" in result.stderr


@pytest.mark.no_cuda
def test_cuda_without_a_gpu_says_so(models_dir, tmp_path) -> None:
    # A chat database of its own: the user's default one (maybe from another tokenwire) is no part of this.
    result = run("serve", "--device", "cuda", "--port", str(free_port()), "--models-dir", str(models_dir),
                 "--database", str(tmp_path / "chats.db"), "--metrics-port", "0", timeout=60)
    assert result.returncode == 1
    assert "cuda" in result.stderr and "onnxruntime-gpu" in result.stderr and "Traceback" not in result.stderr


def test_pull_lists_and_is_idempotent(models_dir) -> None:
    listing = run("pull", "--models-dir", str(models_dir))
    assert listing.returncode == 0 and "smollm2-135m" in listing.stdout
    started = time.perf_counter()
    again = run("pull", "smollm2-135m", "--models-dir", str(models_dir))
    assert again.returncode == 0 and "already in" in again.stderr
    assert time.perf_counter() - started < 15
    unknown = run("pull", "gpt-5", "--models-dir", str(models_dir))
    assert unknown.returncode == 1 and "unknown model 'gpt-5'" in unknown.stderr


def test_pull_recorded_quality_and_chose_the_default(models_dir) -> None:
    from tokenwire.server.build.pull import MIN_TOP1_FOR_INT4
    from tokenwire.server.models.store import ModelStore

    store = ModelStore(models_dir)
    quality = store.get(DEFAULT_INT4).manifest["quality"]
    assert quality["tokens"] >= 2000
    assert {"top1_agreement", "mean_kl", "perplexity", "perplexity_reference"} <= set(quality)
    expected = DEFAULT_INT4 if quality["top1_agreement"] >= MIN_TOP1_FOR_INT4 else "smollm2-135m:fp32"
    assert store.resolve("smollm2-135m") == expected
    assert store.get(DEFAULT_INT4).manifest["graph_sha256"]


def test_pull_fails_clearly_without_the_export_extra(tmp_path) -> None:
    # A Python that cannot import torch: simulate the missing extra by shadowing the module.
    (tmp_path / "torch.py").write_text("raise ImportError('no torch here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TOKENWIRE_MODELS": str(tmp_path / "store")}
    result = subprocess.run(cli("pull", "smollm2-135m"), capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "export' extra" in result.stderr and "pip install 'tokenwire[export]'" in result.stderr


def test_cli_help_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "tokenwire.clients.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout
