"""The committed stubs must be exactly what protoc makes of the committed .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*_pb2*.py*"))
    assert fresh == committed, "a .proto file has no committed stubs, or stubs lack a .proto: run `make proto`"
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (ROOT / "proto" / rel).read_text(), (
            f"{rel} drifted from its .proto: run `make proto` and commit the result"
        )


def test_stubs_import_as_tokenwire_v1() -> None:
    from tokenwire.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "tokenwire.v1"
    assert hasattr(inference_pb2_grpc, "InferenceStub")
    enum = inference_pb2.DESCRIPTOR.enum_types_by_name
    for name in ("FinishReason", "ModelState"):
        assert enum[name].values[0].number == 0 and enum[name].values[0].name.endswith("_UNSPECIFIED")
