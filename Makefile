# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?=              # empty = the packaged embedded default (schemas/example.yaml)

.PHONY: setup demo test bench docs clean

# torch first, alone: clean-fid must never be resolved in the same pip command as a different torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[dev]" "torch==2.14.1" "torchvision==0.29.1"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowsteer demo $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/schedule_effect.py
	$(BIN)/python bench/generate_throughput.py
	$(BIN)/python bench/train_step.py

docs: $(STAMP)                              # regenerate docs/config.md from schemas/config.py
	$(BIN)/python -m schemas.docgen

clean:
	rm -rf runs
