# tierflow: the two set-up commands are `make run` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean

# Reinstalled whenever pyproject.toml changes; editable, so source edits need no reinstall.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The main job: the default scenario (DeepSeek-R1, experts on NVMe SSD, LRU cache in HBM, prefetching).
run: $(BIN)/.installed
	$(BIN)/tierflow simulate --scenario ssd_prefetch

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed-test
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_sim.py

clean:
	rm -rf $(VENV) out build src/*.egg-info .pytest_cache .hypothesis
