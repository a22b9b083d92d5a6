"""The execution providers a device gets (server/engine/session.py), on any machine: onnxruntime's
list of available providers is faked, so the CUDA branches are checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.server.engine import session
from tokenwire.server.engine.session import DeviceUnavailable, make_session, providers_for

CUDA_AND_CPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def offers(monkeypatch):
    def offer(names: list[str]) -> None:
        monkeypatch.setattr(session.ort, "get_available_providers", lambda: list(names))

    return offer


def test_cpu_is_cpu_alone(offers) -> None:
    offers(CUDA_AND_CPU)
    assert providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("device,index", [("cuda", "0"), ("cuda:0", "0"), ("cuda:3", "3")])
def test_cuda_names_its_device_and_keeps_fp32_gemms_fp32(offers, device: str, index: str) -> None:
    offers(CUDA_AND_CPU)
    assert providers_for(device) == [("CUDAExecutionProvider", {"device_id": index, "use_tf32": "0"}),
                                     "CPUExecutionProvider"]


@pytest.mark.parametrize("device", ["cuda:", "cuda:x", "cuda:-1", "rocm", "gpu", ""])
def test_other_devices_are_refused_by_name(offers, device: str) -> None:
    offers(CUDA_AND_CPU)
    with pytest.raises(DeviceUnavailable, match="unknown device"):
        providers_for(device)


def test_cuda_without_the_provider_says_what_to_install(offers) -> None:
    offers(["AzureExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(DeviceUnavailable, match="onnxruntime-gpu") as refused:
        providers_for("cuda")
    assert "AzureExecutionProvider, CPUExecutionProvider" in str(refused.value)


def test_a_cuda_provider_that_fell_back_to_cpu_is_refused(offers, monkeypatch, tmp_path: Path) -> None:
    """onnxruntime drops to CPU (a line in its log) when the CUDA provider's libraries do not load;
    serving on CPU while claiming CUDA would be the worst of both."""
    offers(CUDA_AND_CPU)

    class FellBack:
        def __init__(self, path, sess_options=None, providers=None) -> None:
            self.asked = providers

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(session.ort, "InferenceSession", FellBack)
    with pytest.raises(DeviceUnavailable, match="could not start it for model.onnx"):
        make_session(tmp_path / "model.onnx", "cuda")

    class Started(FellBack):
        def get_providers(self) -> list[str]:
            return CUDA_AND_CPU

    monkeypatch.setattr(session.ort, "InferenceSession", Started)
    started = make_session(tmp_path / "model.onnx", "cuda:1")
    assert started.asked[0] == ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"})
