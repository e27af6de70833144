# embedgate: `make run` sets up and serves the embedded model; `make test` sets up and runs
# every check. scripts/setup does the setting up (system packages, .venv, npm tools).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, from PyTorch's CPU-only wheel index, so the local
# model needs no GPU libraries. TORCH_INDEX_URL= takes torch from your usual index instead;
# TORCH_SPEC= leaves the choice to pip.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
export PYTHON VENV TORCH_SPEC TORCH_INDEX_URL

.PHONY: run test check generate install clean bench soak

run:
	scripts/setup run
	$(VENV)/bin/embedgate serve $(ARGS)

test:
	scripts/setup test
	PYTHON=$(PY) scripts/check

check: test

generate:
	scripts/setup test
	PYTHON=$(PY) scripts/generate

install:
	scripts/setup run

clean:
	rm -rf $(VENV) node_modules build clients/typescript/node_modules clients/typescript/dist

# The side-by-side benchmark behind docs/benchmarks.md (needs h2load: nghttp2-client).
# `make bench ARGS=--quick` is the few-second smoke run.
bench:
	scripts/setup test
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) -m bench $(ARGS)

# 10,000 RPCs through a model with one deployment down and the other failing 12 % of
# requests: no RPC may fail, every vector must be its input's (docs/soak.json and the
# soak section of docs/benchmarks.md). `make soak ARGS="--rpcs 300"` takes seconds.
soak:
	scripts/setup test
	$(PY) -m bench.soak $(ARGS)
