# Every target works on a fresh clone: each depends on `setup`, which builds .venv once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,plots]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/accord demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/adacons_toy.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
