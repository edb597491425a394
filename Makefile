# medfusion: two set-up commands, `make demo` and `make test`. Both create .venv when absent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test test-fast demo lint clean orthanc

# Orthanc + its DICOMweb plugin (Debian packages): the real PACS the DICOM pipeline tests run against.
# Quick no-op when installed; uses sudo when not root. A failed install stops `make test` unless
# MEDFUSION_SKIP_PACS=1 is set (then the PACS tests skip; CI never sets it).
ORTHANC_PLUGIN := /usr/share/orthanc/plugins/libOrthancDicomWeb.so

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the pin resolves to the local CPU wheel; an unpinned torch would pull GBs of CUDA packages
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

orthanc:
	@if [ -x /usr/sbin/Orthanc ] && [ -f $(ORTHANC_PLUGIN) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing Debian packages orthanc orthanc-dicomweb"; \
	  { $$SUDO apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      --no-install-recommends orthanc orthanc-dicomweb >/dev/null; } \
	    || { echo "could not install orthanc (need root or sudo); MEDFUSION_SKIP_PACS=1 skips the PACS tests"; \
	         [ "$$MEDFUSION_SKIP_PACS" = 1 ] || exit 1; }; \
	else echo "no apt-get: install Orthanc with its DICOMweb plugin yourself (MEDFUSION_SKIP_PACS=1 skips the PACS tests)"; \
	  [ "$$MEDFUSION_SKIP_PACS" = 1 ] || exit 1; fi

test: $(STAMP) orthanc
	$(BIN)/ruff check medfusion tests benchmarks tutorials
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# the quick loop while developing: no bundle runs, tutorials, SIGKILL resume, torchrun or PACS tests
test-fast: $(STAMP)
	$(BIN)/ruff check medfusion tests benchmarks tutorials
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m medfusion.demo --out $(DEMO_DIR) --overwrite

lint: $(STAMP)
	$(BIN)/ruff check medfusion tests benchmarks tutorials
	$(BIN)/ruff format --check medfusion tests benchmarks tutorials
	# layers only point down (contract in pyproject.toml, picture in docs/architecture.md)
	$(BIN)/lint-imports --no-cache
	# types of medfusion/ and benchmarks/ at zero errors ([tool.mypy] in pyproject.toml)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO_DIR)
