# The two commands a user needs are `make demo` and `make test`; set-up is part of each.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE
# Fewer page faults in the big convolution buffers of the autoencoder (see benchmarks/).
export GLIBC_TUNABLES := glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184:glibc.malloc.top_pad=1073741824

.PHONY: demo test test-slow setup browser default-models evaluate-default evaluate-downstream clean

demo: $(STAMP)
	$(BIN)/histosynth demo --out demo

test: $(STAMP) browser
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow

setup: $(STAMP)

# Retrain the models shipped in src/histosynth/weights/ (hours on a CPU; stages resume).
default-models: $(STAMP)
	$(BIN)/python scripts/default_models.py

# The thesis' evaluations on the phantom with the shipped models (about an hour on 2 CPU cores).
evaluate-default: $(STAMP)
	$(BIN)/python scripts/default_models.py --stage data
	$(BIN)/python scripts/evaluate_default.py

# Does synthetic data help a segmenter? `experiment mix` on the phantom with the shipped models: the core
# comparison, the mask model's pairs, multi-class and the scarcity curve (many hours on 2 CPU cores; see README).
evaluate-downstream: $(STAMP)
	$(BIN)/python scripts/default_models.py --stage data
	$(BIN)/python scripts/evaluate_downstream.py

# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The survey's end-to-end test drives Debian's Chromium; install it when missing and we may.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed; browser tests will be skipped"; \
	fi

clean:
	rm -rf $(VENV) demo .pytest_cache
