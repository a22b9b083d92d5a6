"""TLS (Security issue, 18): `serve --tls-cert/--tls-key` serves gRPC over TLS, the CLI and the
bridge reach it with `--tls-ca`, and the bridge serves HTTPS with `--http-tls-cert/--http-tls-key`;
a plain client is refused."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import Proc, cli, free_port

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def secure_stub(target: str, cert: Path) -> tuple[grpc.Channel, pb_grpc.InferenceStub]:
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()))
    return channel, pb_grpc.InferenceStub(channel)


def test_grpc_over_tls_for_the_cli_and_the_bridge(models_dir, tmp_path, certificate) -> None:
    cert, key = certificate
    port = free_port()
    log = tmp_path / "tls-server.log"
    proc = subprocess.Popen(cli("serve", "--port", str(port), "--models-dir", str(models_dir), "--metrics-port", "0",
                                "--database", str(tmp_path / "tls.db"), "--tls-cert", str(cert), "--tls-key", str(key)),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Proc(proc, log, target=f"127.0.0.1:{port}")
    bridge = None
    try:
        channel, stub = secure_stub(server.target, cert)
        grpc.channel_ready_future(channel).result(timeout=60)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError):
            pb_grpc.InferenceStub(plain).ListModels(pb.ListModelsRequest(), timeout=5)
        channel.close()

        models = subprocess.run(cli("--tls-ca", str(cert), "models", "--server", server.target),
                                capture_output=True, text=True, timeout=60)
        assert models.returncode == 0 and "smollm2-135m:int4" in models.stdout, models.stderr
        refused = subprocess.run(cli("models", "--server", server.target), capture_output=True, text=True,
                                 timeout=60, env={k: v for k, v in os.environ.items() if k != "TOKENWIRE_TLS_CA"})
        assert refused.returncode != 0

        http_port = free_port()
        blog = tmp_path / "tls-bridge.log"
        bproc = subprocess.Popen(cli("bridge", "--server", server.target, "--http-port", str(http_port),
                                     "--tls-ca", str(cert), "--http-tls-cert", str(cert), "--http-tls-key", str(key)),
                                 stdout=blog.open("w"), stderr=subprocess.STDOUT)
        bridge = Proc(bproc, blog)
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/v1/models", context=context,
                                            timeout=10) as resp:
                    assert resp.status == 200 and b"smollm2-135m:int4" in resp.read()
                    break
            except OSError:
                assert bproc.poll() is None and time.monotonic() < deadline, blog.read_text()
                time.sleep(0.3)
    finally:
        if bridge is not None:
            bridge.stop()
        server.stop()
