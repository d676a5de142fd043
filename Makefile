# dino_keras: `make demo` trains, evaluates and exports on Fashion-MNIST; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_DIR ?= runs/demo
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint bazel-test data venv dev clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall only when a requirements file changes.
$(VENV)/.runtime-installed: requirements.txt | $(PY)
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt requirements-parity.txt $(VENV)/.runtime-installed
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime-installed
dev: $(VENV)/.dev-installed

# Fashion-MNIST from Debian's package where apt is available; elsewhere the demo falls back to
# TFDS's download (needs a network connection).
data:
	@if [ -d $(FASHION_MNIST) ]; then echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else echo "apt not available: the demo will download Fashion-MNIST with TFDS"; fi

demo: venv data
	$(PY) scripts/train.py --flagfile=configs/demo.cfg --output_dir=$(DEMO_DIR)
	$(PY) scripts/export.py --checkpoint=$(DEMO_DIR) --export_dir=$(DEMO_DIR)/export --overwrite_version

# Two test processes: most tests spend their time in one thread (XLA compilation, Python), so
# two share the two cores; slow tests go first (tests/conftest.py) and an idle process takes
# tests queued for the other.
test: dev data
	$(PY) -m pytest tests -n 2 --dist worksteal

lint: dev
	$(VENV)/bin/ruff check dino_keras scripts tests benchmarks

bazel-test: venv
	bash scripts/bazel_test.sh

clean-demo:
	rm -rf $(DEMO_DIR)
