# One venv for everything; both targets create it on first use and reuse it after.
VENV ?= .venv
PY := $(VENV)/bin/python
# A torch + torchvision pair that import together (PyPI torchvision needs its own torch build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-quick test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/demo.py --out runs/demo

demo-quick: setup
	$(PY) scripts/demo.py --out runs/demo-quick --quick

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) scripts/bench_reward.py

clean:
	rm -rf runs .pytest_cache
