# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= shakespeare

# Offline here: use the local copy of tiny Shakespeare when it sits beside the checkout.
ifeq ($(origin GPTLAB_DATA_MIRROR), undefined)
ifneq ($(wildcard ../shared/data/tinyshakespeare.txt),)
export GPTLAB_DATA_MIRROR := $(abspath ../shared/data)
endif
endif

.PHONY: install browser demo test test-fast lint clean

install: $(VENV)/.installed

# A torch already importable by $(PYTHON) is kept (the venv sees it); otherwise the CPU build
# torch==2.13.0 goes in first, because an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[all]"
	@touch $@

# The browser test drives the system Chromium through Playwright (whose own download needs the
# internet): installed with apt when missing and we are root; otherwise say how, and go on.
browser:
	@[ -n "$$GPTLAB_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium) || \
		echo "could not install chromium; the browser test will fail until it is there"; \
	else \
		echo "no chromium: the browser test will fail; install it with 'sudo apt-get install chromium' (or set GPTLAB_CHROMIUM)"; \
	fi

demo: install
	$(VENV)/bin/gptlab train $(DATA) --tokenizer char --preset cpu-quick --out runs/demo --overwrite

test: install browser
	$(PY) -m pytest -q

test-fast: install browser
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
