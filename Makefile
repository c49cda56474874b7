# Flywheel — every target is idempotent; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

TOOLS_DIR     ?= $(CURDIR)/.tools
TANSU_VERSION := 0.6.0
TANSU         := $(TOOLS_DIR)/bin/tansu
TANSU_STAMP   := $(TOOLS_DIR)/.tansu-$(TANSU_VERSION)
VENV          ?= $(CURDIR)/.venv
PY_STAMP      := $(VENV)/.flywheel-python-2
SYSTEM_PKGS   := libssl-dev zlib1g-dev pkg-config
CARGO         ?= cargo
FLYWHEEL      := $(CARGO) run --quiet -p flywheel --

export FLYWHEEL_TANSU_BIN := $(TANSU)

.PHONY: help setup system-deps tools python kernels-check fmt fmt-check lint test bench bench-gpu demo broker topics clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: system-deps tools python ## Install everything the tests and the demo need (broker, Python readers); idempotent

system-deps: ## Install the C libraries the Kafka client builds against (Debian; skipped when present)
	@missing=$$(for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

tools: $(TANSU_STAMP) ## Install the tansu 0.6.0 Kafka-protocol broker into .tools/ (about 10 min cold)

$(TANSU_STAMP):
	@if [ -x "$(TANSU)" ] && "$(TANSU)" --version 2>/dev/null | grep -q "$(TANSU_VERSION)" \
	    && "$(TANSU)" --help | grep -q "Storage engines: dynostore, libsql"; then \
	  echo "tansu $(TANSU_VERSION) already installed in $(TOOLS_DIR)"; \
	else \
	  echo "installing tansu $(TANSU_VERSION) with storage engines (dynostore, libsql) into $(TOOLS_DIR)"; \
	  env -u CARGO_TARGET_DIR $(CARGO) install tansu --version $(TANSU_VERSION) --locked \
	    --features dynostore,libsql --root "$(TOOLS_DIR)" && \
	  "$(TANSU)" --help | grep -q "Storage engines: dynostore, libsql" || \
	    { echo "tansu was built without a storage engine: it would drop data" >&2; exit 1; }; \
	fi
	@touch $@

python: $(PY_STAMP) ## Create .venv with duckdb, pyarrow (independent Parquet readers) and numpy (independent model reference)

$(PY_STAMP):
	python3 -m venv "$(VENV)"
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow numpy
	"$(VENV)/bin/python" -c "import duckdb, pyarrow, numpy; print('duckdb', duckdb.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__)"
	@touch $@

# NVRTC (the compiler) and the CUDA headers from PyPI, matching the GPU
# machine's CUDA 13.0: enough to compile every kernel without a GPU.
CUDA_STAMP := $(VENV)/.cuda-nvrtc-13.0.88

kernels-check: $(CUDA_STAMP) ## Compile every CUDA kernel with NVRTC for sm_90 (no GPU needed)
	"$(VENV)/bin/python" services/trainer/src/kernels/nvrtc_check.py sm_90

$(CUDA_STAMP): $(PY_STAMP)
	"$(VENV)/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
	@touch $@

fmt: ## Format the code
	$(CARGO) fmt --all

fmt-check: ## Fail if the code is not formatted
	$(CARGO) fmt --all -- --check

lint: ## Clippy on every target with warnings as errors, and on the trainer's CUDA side (compiles without CUDA)
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p flywheel-trainer --features cuda --all-targets --locked -- -D warnings

test: setup fmt-check lint kernels-check ## Everything CI runs: setup, format check, clippy, unit and integration tests on the real broker
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked

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
	$(CARGO) run --release --locked -p flywheel-trainer --example train_bench

demo: setup ## Run the whole flywheel locally (embedded broker, every service, simulated product) until two promotions
	$(CARGO) build --workspace --bins --locked
	$(FLYWHEEL) up --tansu-bin "$(TANSU)" --rate 30 --stop-after-promotions 2 --duration-s 900

broker: tools ## Run the embedded broker in the foreground on 127.0.0.1:9092 (data in .flywheel/broker)
	$(FLYWHEEL) broker --tansu-bin "$(TANSU)"

topics: ## Create the topic map on FLYWHEEL_KAFKA_BROKERS (default 127.0.0.1:9092)
	$(FLYWHEEL) topics create

clean: ## Remove build outputs and local broker data (keeps .tools and .venv)
	$(CARGO) clean
	rm -rf .flywheel
