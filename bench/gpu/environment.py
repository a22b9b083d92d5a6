"""What the machine offers, before anything is installed: versions, onnxruntime's providers, the GPU.

    python bench/gpu/environment.py OUT.json

Prints the versions of the packages tokenwire runs on (read from their metadata, nothing heavy
imported), `onnxruntime.get_available_providers()`, which onnxruntime distribution is installed
(`onnxruntime` is CPU-only; `onnxruntime-gpu` brings the CUDA provider) and whether its CUDA
provider library is there, nvidia-smi's view of the GPU, and torch's (the image's torch sees the
GPU even where onnxruntime cannot). Writes it all as JSON; exit status 0 either way.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "torch", "transformers", "tokenizers", "grpcio",
            "protobuf", "jinja2", "aiohttp", "prometheus-client", "pytest", "pytest-timeout", "setuptools",
            "packaging", "peewee", "grpcio-status", "grpcio-health-checking", "grpcio-reflection",
            "googleapis-common-protos", "llguidance")


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run(cmd: list[str], timeout: float = 60) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({type(exc).__name__}: {exc})"


def main() -> None:
    out = Path(sys.argv[1])
    report: dict = {"python": platform.python_version(), "executable": sys.executable,
                    "machine": platform.machine(), "versions": {p: version(p) for p in PACKAGES}}
    for name in ("python", "onnxruntime", "onnx", "torch", "transformers", "tokenizers", "grpcio", "protobuf"):
        print(f"{name:>13}: {report['python'] if name == 'python' else report['versions'][name]}", flush=True)
    try:
        import onnxruntime as ort

        report["providers"] = ort.get_available_providers()
        capi = Path(ort.__file__).parent / "capi"
        report["onnxruntime_provider_libraries"] = sorted(p.name for p in capi.glob("libonnxruntime_providers_*"))
        report["onnxruntime_build"] = {"version": ort.__version__, "device": ort.get_device()}
    except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
        report["providers"] = []
        report["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"
    print(f"    providers: {report['providers']}", flush=True)
    report["cuda_provider"] = "CUDAExecutionProvider" in report["providers"]
    if shutil.which("nvidia-smi"):
        report["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                                    "--format=csv,noheader"])
        print(f"          gpu: {report['nvidia_smi']}", flush=True)
    report["torch_cuda"] = run([sys.executable, "-c",
                                "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), "
                                "torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"], timeout=90)
    print(f"   torch cuda: {report['torch_cuda']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
