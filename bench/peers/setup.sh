#!/usr/bin/env bash
# Builds what bench/bench_peers.py measures tokenwire against. Idempotent; the slow artefacts are
# cached outside the clone ($TOKENWIRE_PEERS_CACHE, default ~/.cache/tokenwire/peers), so a fresh
# clone on the same machine skips them:
#   src/       llama-cpp-python's source archive (pip download --no-binary :all:)
#   wheels/B/  the llama-cpp-python wheel built from it, CPU only (~13 min on 2 cores, once)
#   bin/       llama.cpp's llama-server-B, llama-quantize-B and llama-tokenize-B built from the
#              archive's vendor/llama.cpp in one cmake build (~13 min, once)
# where B = VERSION-noamx names the build: llama.cpp's AMX kernels (ggml-cpu/amx, compiled in by
# -march=native on CPUs with AMX) crash in ggml_backend_amx_mul_mat at the first decode on this
# workplace's Sapphire Rapids machines (SIGSEGV, Q4_1 and Q4_K_M files alike, llama-cpp-python
# 0.3.36), so they are left out (-mno-amx-int8); the AVX-512 VNNI kernels run instead.
#   hf/        SmolLM2-135M-Instruct as a transformers folder, rebuilt from the GGUF
#   genai/     onnxruntime-genai's int4 model, made by genai's own builder from hf/
# The peers get a venv of their own (.venv-peers): genai's builder wants transformers 5.x, which
# our export pins (4.57.x) exclude. Nothing here runs inside the project's venv.
#
# A step that fails does not stop the others: it leaves its reason in $CACHE/<step>.failed, and
# the benchmark skips that peer and prints the reason.
#
#     bash bench/peers/setup.sh            # everything
#     bash bench/peers/setup.sh venv|server|genai
set -uo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-python3}
VENV=${PEERS_VENV:-.venv-peers}
CACHE=${TOKENWIRE_PEERS_CACHE:-$HOME/.cache/tokenwire/peers}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
GENAI_VERSION=${GENAI_VERSION:-0.18.0}
MODELS=${TOKENWIRE_MODELS:-$HOME/.local/share/tokenwire/models}
GGUF=${PEERS_GGUF:-$MODELS/.cache/SmolLM2-135M-Instruct.Q4_1.gguf}
JOBS=${JOBS:-$(nproc)}
# CPU only, tuned for this machine; no GPU backends, no network at build time.
CPU_CMAKE="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_BLAS=OFF"
# An explicit -mno-amx-int8 outlasts -march=native wherever it stands (no __AMX_INT8__: no AMX code).
if echo | cc -mno-amx-int8 -E - >/dev/null 2>&1; then
  CPU_CMAKE="$CPU_CMAKE -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
BUILD=$LLAMA_CPP_PYTHON_VERSION-noamx
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

SDIST=$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
WHEELS=$CACHE/wheels/$BUILD
SERVER_BIN=$CACHE/bin/llama-server-$BUILD
QUANTIZE_BIN=$CACHE/bin/llama-quantize-$BUILD
TOKENIZE_BIN=$CACHE/bin/llama-tokenize-$BUILD
HF_DIR=$CACHE/hf/smollm2-135m-instruct
GENAI_DIR=$CACHE/genai/smollm2-135m-int4-$GENAI_VERSION

mkdir -p "$CACHE"
log() { printf '[peers %(%H:%M:%S)T] %s\n' -1 "$*"; }
failed() { log "FAILED: $1: $2"; printf '%s\n' "$2" >"$CACHE/$1.failed"; return 1; }
took() { log "$1 took $(( $(date +%s) - $2 )) s"; }

sdist() {
  [ -f "$SDIST" ] && return 0
  log "downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION source archive"
  mkdir -p "$CACHE/src"
  pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/src"
}

venv() {
  rm -f "$CACHE/venv.failed"
  local t0 wheel stamp
  t0=$(date +%s)
  sdist || { failed venv "pip download of llama-cpp-python's source archive failed"; return 1; }
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then
    log "building the llama-cpp-python wheel from source (CPU only; minutes)"
    mkdir -p "$WHEELS"
    CMAKE_ARGS="$CPU_CMAKE -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
      pip wheel -q --no-deps "$SDIST" -w "$WHEELS" \
      || { failed venv "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source failed (see the pip output above)"; return 1; }
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -1)
    took "llama-cpp-python wheel" "$t0"
  fi
  stamp="$VENV/.installed-$BUILD-$GENAI_VERSION"
  [ -f "$stamp" ] && return 0
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || { failed venv "could not create $VENV"; return 1; }
  log "installing the peers into $VENV"
  # torch and transformers 5.x only serve genai's model builder (and reading the GGUF).
  "$VENV/bin/pip" install -q "$wheel" "onnxruntime-genai==$GENAI_VERSION" "transformers>=5,<6" "torch==2.13.0" \
      accelerate gguf onnx onnx-ir numpy openai sentencepiece protobuf \
    || { failed venv "pip install into $VENV failed"; return 1; }
  # The same version may be there from an earlier build (with AMX): this wheel replaces it.
  "$VENV/bin/pip" install -q --force-reinstall --no-deps "$wheel" || { failed venv "pip install of $wheel failed"; return 1; }
  touch "$stamp"
  took "peers venv" "$t0"
}

server() {
  rm -f "$CACHE/server.failed"
  [ -x "$SERVER_BIN" ] && [ -x "$QUANTIZE_BIN" ] && [ -x "$TOKENIZE_BIN" ] && return 0
  local t0 work tool
  t0=$(date +%s)
  sdist || { failed server "pip download of llama-cpp-python's source archive failed"; return 1; }
  work=$CACHE/build/llama-server-$LLAMA_CPP_PYTHON_VERSION
  rm -rf "$work" && mkdir -p "$work"
  tar xzf "$SDIST" -C "$work" --strip-components=1 || { failed server "could not unpack $SDIST"; return 1; }
  log "building llama-server, llama-quantize, llama-tokenize from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION's vendor/llama.cpp (~13 min on 2 cores)"
  # Static, so the one binary can be cached; the web UI is neither built (npm) nor downloaded.
  # shellcheck disable=SC2086
  cmake -S "$work/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $CPU_CMAKE >"$work/cmake.log" 2>&1 \
    || { tail -20 "$work/cmake.log"; failed server "cmake configure failed (log: $work/cmake.log)"; return 1; }
  # The quantizer (bench/make_random_gguf.py) and the tokenizer CLI share the server's libraries:
  # the extra targets cost a few object files.
  cmake --build "$work/build" --target llama-server llama-quantize llama-tokenize -j "$JOBS" >"$work/build.log" 2>&1 \
    || { tail -20 "$work/build.log"; failed server "building llama-server/llama-quantize/llama-tokenize failed (log: $work/build.log)"; return 1; }
  mkdir -p "$CACHE/bin"
  for tool in server quantize tokenize; do
    cp "$work/build/bin/llama-$tool" "$CACHE/bin/llama-$tool.tmp" \
      && mv "$CACHE/bin/llama-$tool.tmp" "$CACHE/bin/llama-$tool-$BUILD" \
      || { failed server "could not copy llama-$tool into $CACHE/bin"; return 1; }
  done
  "$SERVER_BIN" --version >/dev/null 2>&1 || { failed server "the built llama-server does not run"; return 1; }
  "$QUANTIZE_BIN" --help >/dev/null 2>&1; [ $? -le 1 ] || { failed server "the built llama-quantize does not run"; return 1; }
  rm -rf "$work"
  took "llama-server" "$t0"
}

genai() {
  rm -f "$CACHE/genai.failed"
  [ -f "$GENAI_DIR/genai_config.json" ] && return 0
  [ -f "$VENV/.installed-$BUILD-$GENAI_VERSION" ] \
    || { failed genai "the peers venv is missing (its step failed)"; return 1; }
  [ -f "$GGUF" ] || { failed genai "no GGUF at $GGUF (run: make model)"; return 1; }
  local t0
  t0=$(date +%s)
  if [ ! -f "$HF_DIR/config.json" ]; then
    log "rebuilding a transformers folder from the GGUF (transformers 5.x)"
    "$VENV/bin/python" bench/peers/gguf_to_hf.py "$GGUF" "$HF_DIR" \
      || { failed genai "could not rebuild a transformers folder from $GGUF (see above)"; return 1; }
  fi
  log "building the genai int4 model with onnxruntime_genai.models.builder"
  rm -rf "$GENAI_DIR.tmp"
  mkdir -p "$CACHE/build"
  "$VENV/bin/python" -m onnxruntime_genai.models.builder -i "$HF_DIR" -o "$GENAI_DIR.tmp" -p int4 -e cpu \
      -c "$CACHE/build/genai-cache" >"$CACHE/build/genai-builder.log" 2>&1 \
    || { tail -20 "$CACHE/build/genai-builder.log"
         failed genai "onnxruntime_genai.models.builder failed on $HF_DIR (log: $CACHE/build/genai-builder.log)"
         return 1; }
  rm -rf "$CACHE/build/genai-cache"
  [ -f "$GENAI_DIR.tmp/genai_config.json" ] || { failed genai "the builder wrote no genai_config.json"; return 1; }
  rm -rf "$GENAI_DIR" && mv "$GENAI_DIR.tmp" "$GENAI_DIR"
  took "genai model" "$t0"
}

status=0
case "${1:-all}" in
  venv) venv || status=1 ;;
  server) server || status=1 ;;
  genai) genai || status=1 ;;
  all)
    venv || status=1
    server || status=1
    genai || status=1
    ;;
  *) echo "usage: $0 [all|venv|server|genai]" >&2; exit 2 ;;
esac
# A failed peer is skipped by the benchmark, not fatal to it.
[ $status = 0 ] || log "some peers could not be built; bench/bench_peers.py will skip them and say why"
exit 0
