# medfusion: two set-up commands, `make demo` and `make test`. Both create .venv when absent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test demo lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the pin resolves to the local CPU wheel; an unpinned torch would pull GBs of CUDA packages
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check medfusion tests benchmarks tutorials
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(BIN)/python -m medfusion.demo --out $(DEMO_DIR) --overwrite

lint: $(STAMP)
	$(BIN)/ruff check medfusion tests benchmarks tutorials
	$(BIN)/ruff format --check medfusion tests benchmarks tutorials

clean:
	rm -rf $(VENV) $(DEMO_DIR)
