# tierflow: the two set-up commands are `make run` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out

.PHONY: run test bench clean

# Reinstalled whenever pyproject.toml changes; editable, so source edits need no reinstall.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	@mkdir -p $(OUT)
	$(BIN)/tierflow trace gen --model deepseek-r1 --tokens 20000 --seed 0 --out $(OUT)/demo-deepseek-r1.h5
	$(BIN)/tierflow trace info $(OUT)/demo-deepseek-r1.h5

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed-test
	$(BIN)/python benchmarks/bench_trace.py

clean:
	rm -rf $(VENV) $(OUT) build src/*.egg-info .pytest_cache .hypothesis
