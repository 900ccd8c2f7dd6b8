# One venv for everything, installed from the lock: the exact versions the test suite passed with, so a fresh
# clone today and in three months builds the same environment. The venv is rebuilt whenever the lock changes.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
# A torch + torchvision pair that import together (PyPI torchvision needs its own torch build); `make lock`
# resolves everything else around it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Packages `make test-latest` takes at their newest release even past an upper bound in pyproject.toml, to see
# whether the bound can go (e.g. UNCAP=transformers).
UNCAP ?=
# Extra pytest arguments for `make test-latest` (e.g. PYTEST_ARGS="-k lora").
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-quick test test-latest lock lint bench clean

$(VENV)/.installed: $(LOCK) pyproject.toml
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/social-refl-demo --out runs/demo

demo-quick: setup
	$(VENV)/bin/social-refl-demo --out runs/demo-quick --quick

lint: setup
	$(VENV)/bin/ruff check .

# The documentation is built strictly (mkdocs.yml): a broken link or anchor, or a page left out of the nav, fails.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mkdocs build --strict --site-dir .site
	$(PY) -m pytest -q

# Resolve the newest releases pyproject.toml admits (torch pinned above) into a throwaway venv and write the
# lock from it. Then `make test` installs from the new lock; commit it only when the suite passes.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-lock/bin/python -m pip install -q '.[dev]'
	.venv-lock/bin/python -m pip check
	{ echo "# The exact versions the test suite passed with: \`make lock\` writes this file, \`make test\` and"; \
	  echo "# \`make demo\` install from it. Resolved on $$(date -u +%Y-%m-%d) for Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'), Linux."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude social-refl; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The suite against the newest releases of everything (not part of CI: its result depends on the day). Run it
# before refreshing the lock and whenever a dependency publishes a release; it prints what differs from the lock.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager torch torchvision
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(if $(UNCAP),.venv-latest/bin/python -m pip install -q --upgrade $(UNCAP))
	.venv-latest/bin/python -m pip freeze --all --exclude social-refl | \
	  .venv-latest/bin/python -m runkit.lockfile $(LOCK)
	.venv-latest/bin/ruff check .
	.venv-latest/bin/mkdocs build --strict --site-dir .site
	.venv-latest/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.reward

clean:
	rm -rf runs .pytest_cache .site
