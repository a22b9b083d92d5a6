#!/usr/bin/env bash
# The CUDA path on a bare GPU machine, in one run of under 8 minutes (docs/gpu.md).
#
# On the device tool: run with carry [".whl"] (bash bench/gpu_wheels.sh fills it here first) and
# the command `bash bench/gpu_check.sh`. Steps, each timed and bounded by what is left of the budget:
#   environment   versions, onnxruntime's providers, the GPU; no CUDA provider -> "blocked", exit 0
#   install       the carried wheels the image lacks (into WORK/site), tokenwire itself (--no-deps)
#   build         the default model's shape with random weights, CUDA and CPU layouts (no download)
#   probe         the engine alone: op placement, prefill, decode per batch size, row bookkeeping
#   tests         pytest -m cuda tests/engine/test_cuda_path.py
#   bench_single  bench/bench_single.py on the device (decode tok/s, TTFT)
#   bench_streams bench/bench_concurrency.py on the device (1/8/32/64 streams)
# Results in $OUT (default build/gpu_out): summary.json, gpu_check.log, env/probe/checks/bench JSON.
#
# Knobs: TOKENWIRE_GPU_CHECK_CPU=1 rehearses on a CPU (no provider check, small sizes, CPU layout);
# TOKENWIRE_GPU_CHECK_ONLY=tests,bench_single runs only those steps after install and build (a
# second, shorter run); TOKENWIRE_GPU_CHECK_BUDGET seconds for all steps (470); PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/build/gpu_out}
WORK=${TOKENWIRE_GPU_WORK:-$ROOT/build/gpu_work}
CPU_MODE=${TOKENWIRE_GPU_CHECK_CPU:-0}
ONLY=${TOKENWIRE_GPU_CHECK_ONLY:-}
BUDGET_S=${TOKENWIRE_GPU_CHECK_BUDGET:-470}
PY=${PYTHON:-python3}
STORE=$WORK/store
mkdir -p "$OUT" "$WORK"
rm -f "$WORK"/steps.tsv "$WORK"/gpu-*.csv "$WORK"/pytest.xml
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENWIRE_BENCH_RESULTS=$WORK/results
export TOKENWIRE_DATABASE=$WORK/chats.db  # the benchmarks' servers keep their chats here, not in the user's store
STARTED=$(date +%s)

if [ "$CPU_MODE" = 1 ]; then
  MODE=cpu DEVICE=cpu LAYOUT=cpu
else
  MODE=gpu DEVICE=cuda LAYOUT=cuda
fi
MODEL=random-smollm2-135m:$LAYOUT

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, at most LIMIT_S and what the budget has left;
# records NAME, exit status and seconds in WORK/steps.tsv; samples the GPU meanwhile.
step() {
  local name=$1 limit=$2 left rc sampler="" t0 t1
  shift 2
  case "$name" in environment | install | build) ;; *)
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
      printf '%s\tskipped\t0\n' "$name" >>"$WORK/steps.tsv"
      return 0
    fi ;;
  esac
  left=$((BUDGET_S - ($(date +%s) - STARTED)))
  if ((left < 15)); then
    echo "== $name: not run, the ${BUDGET_S}s budget is spent"
    printf '%s\tout-of-time\t0\n' "$name" >>"$WORK/steps.tsv"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit}s) $(date -u +%H:%M:%S)"
  if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
      >"$WORK/gpu-$name.csv" 2>/dev/null &
    sampler=$!
  fi
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  t1=$(date +%s.%N)
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" >>"$WORK/steps.tsv"
  echo "== $name: exit $rc after $(tail -1 "$WORK/steps.tsv" | cut -f3)s"
  return "$rc"
}

finish() {  # finish MODE: the summary, the servers' last lines, then exit 0 (the findings are in $OUT)
  for log in "$WORK"/results/server-*.log; do
    [ -f "$log" ] && { echo "---- $(basename "$log")"; tail -40 "$log"; }
  done >"$OUT/servers.log" 2>/dev/null
  [ -s "$OUT/servers.log" ] || rm -f "$OUT/servers.log"
  "$PY" bench/gpu/summary.py "$WORK" "$OUT" "$1"
  echo "total wall time $(($(date +%s) - STARTED))s; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  exit 0
}

main() {
  echo "tokenwire GPU check ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null)"
  step environment 120 "$PY" bench/gpu/environment.py "$WORK/env.json"
  if [ "$MODE" = gpu ] && ! "$PY" -c "import json, sys; sys.exit(not json.load(open(sys.argv[1]))['cuda_provider'])" \
    "$WORK/env.json" 2>/dev/null; then
    echo "blocked: no CUDA provider: this onnxruntime offers $("$PY" -c "import json, sys
print(', '.join(json.load(open(sys.argv[1])).get('providers', [])) or 'nothing (it did not import)')" "$WORK/env.json"
    ); tokenwire's CUDA path needs onnxruntime-gpu, whose wheel is too large to carry"
    finish blocked
  fi

  # Carried wheels the image lacks (or holds older), into WORK/site, ahead of the image's packages.
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  install() {
    local wheels
    wheels=$("$PY" bench/gpu/carried_wheels.py .whl) || return 1
    if [ -n "$wheels" ]; then
      # shellcheck disable=SC2086  # one path per line, no spaces (wheel names)
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        $wheels || return 1
    fi
    if ! "$PY" -c "import tokenwire.server, tokenwire.v1" 2>/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
        || link_sources || return 1
    fi
    "$PY" -c "
import grpc, google.protobuf, peewee, onnxruntime, tokenizers
import tokenwire.server.app, tokenwire.clients.cli, tokenwire.v1.inference_pb2_grpc, tokenwire.server.api.errors
print('serving imports: grpcio', grpc.__version__, 'protobuf', google.protobuf.__version__, 'peewee',
      peewee.__version__, 'onnxruntime', onnxruntime.__version__, 'tokenizers', tokenizers.__version__)
print('tokenwire from', tokenwire.server.__path__[0])"
  }
  link_sources() {  # pyproject's package-dir mapping as links, when pip cannot install the checkout
    echo "pip could not install the checkout; linking its packages into $WORK/site instead"
    mkdir -p "$WORK/site/tokenwire"
    for f in proto/tokenwire/*; do ln -sfn "$ROOT/$f" "$WORK/site/tokenwire/$(basename "$f")"; done
    for pkg in server bridge clients; do ln -sfn "$ROOT/$pkg" "$WORK/site/tokenwire/$pkg"; done
  }
  export -f install link_sources
  export WORK ROOT PY
  step install 120 bash -c install || finish "$MODE"

  step build 150 "$PY" tests/random_weight_models.py "$STORE" --default "$LAYOUT" || finish "$MODE"

  if [ "$MODE" = gpu ]; then
    step probe 90 "$PY" bench/gpu/probe.py "$STORE" --device cuda --model "$MODEL" --out "$OUT/probe.json"
    TOKENWIRE_GPU_MODELS=$STORE TOKENWIRE_GPU_OUT=$OUT TOKENWIRE_REQUIRE_ALL=1 \
      step tests 200 "$PY" -m pytest -m cuda tests/engine/test_cuda_path.py -q -rfEs -p no:cacheprovider \
      --durations=10 --junitxml="$WORK/pytest.xml"
    step bench_single 150 "$PY" bench/bench_single.py --device cuda --models-dir "$STORE" --model "$MODEL" \
      --runs 3
    step bench_streams 180 "$PY" bench/bench_concurrency.py --device cuda --models-dir "$STORE" \
      --levels 1,8,32,64 --max-batch 64 --queue-size 128 --max-tokens 128
  else  # the same steps at small sizes, the CUDA checks rehearsed on the CPU provider
    step probe 90 "$PY" bench/gpu/probe.py "$STORE" --device cpu --model "$MODEL" --out "$OUT/probe.json" \
      --batches 1,4 --steps 8
    TOKENWIRE_GPU_MODELS=$STORE TOKENWIRE_GPU_OUT=$OUT TOKENWIRE_CUDA_TEST_DEVICE=cpu TOKENWIRE_CUDA_TEST_STEPS=128 \
      step tests 300 "$PY" -m pytest tests/engine/test_cuda_path.py -q -rfEs -p no:cacheprovider \
      --durations=10 --junitxml="$WORK/pytest.xml"
    step bench_single 150 "$PY" bench/bench_single.py --device cpu --models-dir "$STORE" --model "$MODEL" \
      --runs 1 --max-tokens 32 --contexts 100,1000
    step bench_streams 180 "$PY" bench/bench_concurrency.py --device cpu --models-dir "$STORE" \
      --levels 1,4 --max-batch 4 --queue-size 16 --max-tokens 16 --reply-tokens 8 --overload-clients 24
  fi
  for f in single concurrency; do
    [ -f "$WORK/results/$f.json" ] && cp "$WORK/results/$f.json" "$OUT/$f.json"
  done
  finish "$MODE"
}

rm -rf "$WORK/results" "$OUT"/*.json "$OUT"/servers.log
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
