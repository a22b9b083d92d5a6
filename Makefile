# tokenwire: `make run` serves, `make test` tests. Both set everything up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENWIRE_MODELS ?= $(HOME)/.local/share/tokenwire/models
HOST ?= 127.0.0.1
GRPC_PORT ?= 50051
HTTP_PORT ?= 8000

.PHONY: setup model run serve bridge test test-fast test-gguf-files mutation proto bench bench-peers bench-cluster lint browser node postgres haproxy espeak cluster clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installs the project (editable), the model-building extra, speech and image reading, and the dev tools.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[export,voice,vision,dev]"
	touch $@

setup: $(VENV)/.installed

# Builds the default model and the embedding model into the store, and copies in the speech and OCR
# models (pinned sha256; idempotent: instant when present).
model: setup
	$(BIN)/tokenwire pull smollm2-135m
	$(BIN)/tokenwire pull all-minilm-l6-v2
	$(BIN)/tokenwire pull whisper-tiny-en
	$(BIN)/tokenwire pull ppocr-v6

# The Node.js client's packages, exactly as clients/node/package-lock.json pins them (node and
# npm from Debian if missing); reinstalled only when the lockfile changes.
node: clients/node/node_modules/.package-lock.json

clients/node/node_modules/.package-lock.json: clients/node/package.json clients/node/package-lock.json
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; fi; }
	cd clients/node && npm ci --no-audit --no-fund --silent

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

# Debian's PostgreSQL for the chat store's tests (tests/postgres_server.py starts a server of its own
# in a temporary folder; nothing runs as a system service).
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi; }

# Debian's espeak-ng: the speech tests synthesise what they transcribe (tests/speech_audio.py).
espeak:
	@command -v espeak-ng >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; fi; }

# Debian's HAProxy, the router of `make cluster` (started by it; nothing runs as a system service).
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; fi; }

# Replicas behind a router on this machine: PostgreSQL, REPLICAS (2) servers and their bridges, HAProxy;
# the front doors on 127.0.0.1:8080 (HTTP) and 127.0.0.1:50050 (gRPC). Ctrl-C stops all of it.
REPLICAS ?= 2
cluster: model postgres haproxy
	$(BIN)/tokenwire cluster --replicas $(REPLICAS)

run: model
	$(BIN)/tokenwire up --host $(HOST) --port $(GRPC_PORT) --http-port $(HTTP_PORT)

serve: model
	$(BIN)/tokenwire serve --host $(HOST) --port $(GRPC_PORT)

bridge: setup
	$(BIN)/tokenwire bridge --server $(HOST):$(GRPC_PORT) --http-host $(HOST) --http-port $(HTTP_PORT)

# Both tiers: the fast one first (no model, seconds), then the slow one (the real model and servers) on
# two pytest-xdist workers, a file per worker (--dist loadfile keeps a file's shared fixtures in one
# process), and last the few `serial` tests that cannot be spread.
# TOKENWIRE_REQUIRE_ALL=1: a skipped test fails unless tests/skip_policy.py allows its reason (no
# GPU, a CPU without the instruction set), so no end-to-end test passes by skipping; each tier
# lists its skips (-rs) and its slowest tests (--durations).
test: model node browser postgres haproxy espeak
	TOKENWIRE_REQUIRE_ALL=1 $(BIN)/python -m pytest -q -rfEs --durations=10 -m "not slow and not gguf_files"
	TOKENWIRE_REQUIRE_ALL=1 $(BIN)/python -m pytest -q -rfEs --durations=15 -m "slow and not serial" -n 2 --dist loadfile
	TOKENWIRE_REQUIRE_ALL=1 $(BIN)/python -m pytest -q -rfEs --durations=5 -m "slow and serial"

# The fast tier alone: scheduler, sampling, stores, ... on a fake engine; no model needed.
test-fast: setup postgres haproxy
	$(BIN)/python -m pytest -q -m "not slow and not gguf_files"

# The GGUF tokenizer against llama.cpp's recorded ids (tests/data/gguf_tokens.json) for the files make
# test does not fetch (marker gguf_files): llama.cpp's own vocab-only GGUFs, read out of the
# llama-cpp-python source archive (downloaded here into the peers' cache when missing), gemma3-270m
# and qwen2.5-coder-0.5b (found in the store's .cache/ after their pull, or in TOKENWIRE_GGUF_DIRS).
# A file not found fails the test; nothing is skipped.
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
TOKENWIRE_PEERS_CACHE ?= $(HOME)/.cache/tokenwire/peers
test-gguf-files: setup
	@[ -f "$(TOKENWIRE_PEERS_CACHE)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz" ] || \
	  $(BIN)/pip download -q --no-binary :all: --no-deps "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)" -d "$(TOKENWIRE_PEERS_CACHE)/src"
	TOKENWIRE_REQUIRE_ALL=1 TOKENWIRE_PEERS_CACHE="$(TOKENWIRE_PEERS_CACHE)" $(BIN)/python -m pytest -q -rfEs -m gguf_files tests/build/test_gguf_tokenizer.py

proto: setup
	$(BIN)/python proto/generate.py

# Speed is measured here, never asserted in tests: tables on stdout, JSON in bench/results/.
bench: model
	$(BIN)/python bench/bench_single.py
	$(BIN)/python bench/bench_concurrency.py
	$(BIN)/python bench/bench_bridge.py
	$(BIN)/python bench/bench_models.py
	$(BIN)/python bench/bench_constraints.py
	$(BIN)/python bench/bench_shared_prefix.py
	$(BIN)/python bench/bench_long_chat.py
	$(BIN)/python bench/bench_kv_memory.py

# tokenwire against llama.cpp (llama-cpp-python, llama-server) and onnxruntime-genai on the same
# weights. Builds the peers first, in a venv of their own (.venv-peers), caching the slow parts
# (a llama-cpp-python wheel and llama-server: ~25 min on 2 cores, once) in ~/.cache/tokenwire/peers.
# The cluster (make cluster's processes) measured: router vs direct, affinity, a replica killed under load.
bench-cluster: model postgres haproxy
	$(BIN)/python bench/bench_cluster.py

# GGUF=FILE measures that GGUF instead (imported into a temporary store; e.g. the 1.5B random-weight
# Q4_K_M of bench/make_random_gguf.py, or .cache/qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf).
bench-peers: model
	bash bench/peers/setup.sh
	$(BIN)/python bench/bench_peers.py $(if $(GGUF),--gguf "$(GGUF)")

# Mutation testing of the fast tier (mutmut; tools/mutation.py, [tool.mutmut] in pyproject.toml):
# stops after MUTATION_BUDGET seconds, then reports killed/surviving mutants per module and lists
# the survivors. MODULES="server/engine/sampling.py ..." picks fewer; unchanged sources resume.
MUTATION_BUDGET ?= 900
MUTATION_JOBS ?= $(shell nproc)
mutation: setup
	$(BIN)/python tools/mutation.py --budget $(MUTATION_BUDGET) --jobs $(MUTATION_JOBS) $(MODULES)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

# bench/gpu_check.sh rehearsed on this CPU (TOKENWIRE_GPU_CHECK_CPU=1: every step at small sizes, the
# CUDA checks on the CPU provider; results in build/gpu_out/). On a GPU machine the device tool runs
# `bash bench/gpu_check.sh` itself, with the wheels of `bash bench/gpu_wheels.sh` carried: docs/gpu.md.
.PHONY: gpu-check
gpu-check: setup
	TOKENWIRE_GPU_CHECK_CPU=1 PYTHON=$(BIN)/python bash bench/gpu_check.sh
