# nanoternary — `make help` lists every target.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch by default; e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" for CUDA.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
ARGS ?=

.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install the package with its dev extras

train: setup  ## train the tiny model on the stdlib code corpus, export it, report bpb and a sample (ARGS=... for overrides)
	$(PY) train.py model=tiny optim=muon_lion trainer=cpu $(ARGS)

test: setup  ## run the default test suite (fast, CPU)
	$(PY) -m pytest -q $(ARGS)

test-slow: setup  ## run the whole test suite including slow tests
	$(PY) -m pytest -q -m "" $(ARGS)

test-gpu: setup  ## the tests that need a CUDA device: the engine on the GPU, trainer=gpu and trainer=ddp on 1 GPU
	$(PY) -m pytest -q -m gpu $(ARGS)

lint: setup  ## ruff check + format check
	$(VENV)/bin/ruff check nanoternary tests benchmarks train.py
	$(VENV)/bin/ruff format --check nanoternary tests benchmarks train.py

format: setup  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix nanoternary tests benchmarks train.py
	$(VENV)/bin/ruff format nanoternary tests benchmarks train.py

tokenizer: setup  ## train/inspect the tokenizer of a data config, bytes/token on its held-out split (ARGS="data=files data.paths=[src]")
	$(PY) -m nanoternary.cli.tokenizer $(ARGS)

eval-bpb: setup  ## held-out val/loss, val/bpb and gzip/bzip2/xz bits per byte of a model folder (ARGS="export=outputs/train/<run>/export/final")
	$(PY) -m nanoternary.cli.eval_bpb $(ARGS)

bench: setup  ## training tokens/s: our trainer (A) vs a plain eager fp32 loop (B) and a bare loop, for tiny, tiny_fp, seed_tiny (ARGS="device=cuda" ...)
	$(PY) -m nanoternary.cli.bench train $(ARGS)

bench-data: setup  ## tokenization MB/s and peak RSS on a >= 200 MB corpus of stdlib copies (made in a temp dir)
	$(PY) benchmarks/bench_data.py $(ARGS)

MODEL ?= $(lastword $(sort $(wildcard outputs/train/*/export/final)))

serve: setup  ## serve a model: OpenAI-compatible API + chat page on http://127.0.0.1:8080 (MODEL=<export folder or .gguf>, default the newest export; ARGS=port=8000 ...)
	$(PY) -m nanoternary.cli.serve model=$(MODEL) $(ARGS)

export: setup  ## write <folder>/model.gguf from a model folder or .ckpt (MODEL=<path>, default the newest export; ARGS="qtype=tq1_0 arch=nanoternary out=x.gguf")
	$(PY) -m nanoternary.cli.export src=$(MODEL) $(ARGS)

generate: setup  ## stream a completion from a model folder or .gguf (MODEL=<path>; ARGS='prompt="def fib(n):" max_tokens=64')
	$(PY) -m nanoternary.cli.generate model=$(MODEL) $(ARGS)

bench-infer: setup  ## decode tokens/s at batch 1 and 16 vs llama.cpp on one tiny_bitnet GGUF, GGUF MB, bits/weight (ARGS="--threads 1")
	$(PY) benchmarks/bench_infer.py $(ARGS)

bench-serve: setup  ## server tokens/s and p50/p99 latency at 1, 4, 16 concurrent clients (ARGS="--model <path> --threads 1")
	$(PY) benchmarks/bench_serve.py $(ARGS)

report: setup  ## compare every run under outputs/: outputs/report/report.md table + loss/LR plots (ARGS="select=[train/multirun/*/*]")
	$(PY) -m nanoternary.cli.compare $(ARGS)

humaneval: setup  ## HumanEval pass@k of a model folder or .gguf in a sandbox: RUNS MODEL-WRITTEN CODE (MODEL=<path>, default the newest export)
	$(PY) -m nanoternary.cli.eval task=humaneval model=$(MODEL) allow_code_execution=true $(ARGS)

clean-cache:  ## delete cached tokenizers and token files (~/.cache/nanoternary, or NANOTERNARY_CACHE if set)
	rm -rf "$${NANOTERNARY_CACHE:-$$HOME/.cache/nanoternary}"

.PHONY: bench humaneval help setup train test test-slow lint format clean-cache tokenizer eval-bpb bench-data serve bench-serve report export generate bench-infer
