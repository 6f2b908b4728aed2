# Two commands do all set-up on a fresh machine with only Python: `make demo` and `make test`.
# GPU users: make demo TORCH="torch==2.13.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" (an index of your CUDA that carries 2.13)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,rl,bench,tensorboard
RUN ?= runs/sinusoid-demo
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@echo "fastmaml: installing torch and fastmaml into $(VENV) (a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/fastmaml train sinusoid-demo --out $(RUN)
	$(BIN)/fastmaml eval $(RUN)
	$(BIN)/fastmaml plot $(RUN)
	@echo "Outputs are in $(RUN)/: eval.json, results.md, figures/*.png, metrics-*.csv, checkpoints/"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
