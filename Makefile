# embedgate: `make run` starts the server on the embedded model; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, pinned, so sentence-transformers keeps this CPU build instead of pulling
# a CUDA one. Override (e.g. TORCH_SPEC= to skip) when your index serves another.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test check generate install tools clean

run: $(STAMP)
	$(VENV)/bin/embedgate serve $(ARGS)

test: check

check: $(STAMP) tools
	PYTHON=$(PY) scripts/check

generate: $(STAMP) tools
	PYTHON=$(PY) scripts/generate

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install "$(TORCH_SPEC)")
	$(PY) -m pip install -e ./clients/python -e '.[local]' -r requirements-dev.txt
	touch $@

tools: node_modules/.bin/buf clients/typescript/node_modules/.bin/tsc

# `npm install --no-save` rather than `npm ci`: the lock pins buf, but npm ci refuses a
# lock written without the other platforms' optional buf binaries.
node_modules/.bin/buf: package.json package-lock.json
	npm install --no-audit --no-fund --no-save
	touch $@

# The TypeScript client's dependencies, protoc-gen-es and tsc among them.
clients/typescript/node_modules/.bin/tsc: clients/typescript/package.json clients/typescript/package-lock.json
	npm ci --prefix clients/typescript --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) node_modules build clients/typescript/node_modules clients/typescript/dist

# The side-by-side benchmark behind docs/benchmarks.md (needs h2load: nghttp2-client).
# `make bench ARGS=--quick` is the few-second smoke run.
.PHONY: bench
bench: $(STAMP)
	$(PY) -m pip install -r bench/requirements.txt
	$(PY) -m bench $(ARGS)
