#!/usr/bin/env bash
# Downloads, here, the wheels bench/gpu_check.sh installs on the GPU machine (which reaches no
# registry) into .whl/ (git-ignored; the device tool's `carry: [".whl"]` takes it along).
#
# The GPU image holds onnxruntime, onnx, numpy, tokenizers, jinja2, aiohttp, prometheus-client,
# grpcio, protobuf and pytest (docs/gpu.md). What tokenwire needs beyond them to serve, to run its
# benchmarks and `pytest -m cuda`: the grpcio-* helpers the server imports, googleapis-common-protos
# (google.rpc, for the rich error details) and peewee (the chat store). grpcio and protobuf come
# too, in the versions the committed stubs need (grpcio >= 1.85.1, protobuf >= 7.35.1): gpu_check.sh
# installs each carried wheel only where the image lacks it or holds an older version.
# Not carried: llguidance (imported only for structured outputs), the export extra (torch,
# transformers, optimum: the GPU check builds its model with numpy alone), the dev tools.
#
#   bash bench/gpu_wheels.sh            # ~8 MB; PYTHON_VERSION=3.12 by default (the image's python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DEST=.whl
WHEELS=(
  grpcio==1.85.3
  grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1
  grpcio-status==1.85.3
  protobuf==7.36.2
  googleapis-common-protos==1.76.0
  peewee==4.5.3
)
mkdir -p "$DEST"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
# One version of each distribution: an older download left in .whl/ would stop the install there.
"$PY" - "$DEST" "${WHEELS[@]}" <<'EOF'
import re, sys
from pathlib import Path

dest, wanted = Path(sys.argv[1]), {}
for spec in sys.argv[2:]:
    name, version = spec.split("==")
    wanted[re.sub(r"[-_.]+", "_", name).lower()] = version
for wheel in sorted(dest.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    key = re.sub(r"[-_.]+", "_", name).lower()
    if wanted.get(key) != version:
        print(f"removing {wheel.name} (not in the list)")
        wheel.unlink()
EOF
du -ch "$DEST"/*.whl | tail -1
ls -1 "$DEST"
