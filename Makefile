# Everything a fresh clone needs: `make test` and `make demo` create .venv and install first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo format bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not benchmark" -n 2 --dist loadfile --durations=12 --doctest-modules mkd_tf tests

format: $(STAMP)
	$(VENV)/bin/ruff format mkd_tf cli tests benchmarks conftest.py

demo: $(STAMP)
	$(VENV)/bin/mkd demo --out demo

clean:
	rm -rf demo build *.egg-info .pytest_cache
