# The project's commands. Each sets up what it needs (a virtualenv in .venv) on a fresh machine.
#   make demo   - the main job (until the Ray pipeline lands): build a tiny BLOOM and generate from it
#   make test   - the test suite
#   make bench  - compare this implementation with the reference (transformers) at a bloom-560m shape
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build here; the package itself accepts a range (GPU builds included).
PIP_CONSTRAINTS ?= .ci/constraints.txt

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PIP_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(PIP_CONSTRAINTS) -e '.[test]'
	touch $@

demo: install
	$(PY) jobs/demo_generate.py $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) benchmarks/bench_model.py $(ARGS)

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache
