# tierflow: the two set-up commands are `make run` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test bench sweep report paper clean

# Reinstalled whenever pyproject.toml changes; editable, so source edits need no reinstall.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# .venv with tierflow and the test extra, without running anything (run and test do this themselves).
install: $(BIN)/.installed-test

# The main job: the default scenario (DeepSeek-R1, experts on NVMe SSD, LRU cache in HBM, prefetching).
run: $(BIN)/.installed
	$(BIN)/tierflow simulate --scenario ssd_prefetch

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed-test
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_sim.py
	$(BIN)/python benchmarks/bench_replay.py
	$(BIN)/python benchmarks/bench_sweep.py

# Sweeps: `make sweep SWEEP=sweeps/NAME.toml` runs a grid of scenarios into out/sweeps/NAME (rerunning resumes:
# finished points are skipped); `make report` draws its figures and report.md into out/sweeps/NAME/report,
# running whatever points are missing first. WORKERS=N sets the parallel points (default: the cores).
SWEEP ?= sweeps/energy_vs_batch.toml
SWEEP_OUT = out/sweeps/$(basename $(notdir $(SWEEP)))

sweep: $(BIN)/.installed
	$(BIN)/tierflow sweep $(SWEEP) --out $(SWEEP_OUT) $(if $(WORKERS),--workers $(WORKERS))

report: sweep
	$(BIN)/tierflow report $(SWEEP_OUT) --out $(SWEEP_OUT)/report

# The Kyung et al. (IEEE CAL 2025) reproduction and the beyond-the-paper variants: tables (CSV and markdown)
# and figures into out/paper (about 2-5 minutes on 2 cores; rerunning resumes from the finished cells).
paper: $(BIN)/.installed
	$(BIN)/tierflow paper --out out/paper $(if $(WORKERS),--workers $(WORKERS))

clean:
	rm -rf $(VENV) out build src/*.egg-info .pytest_cache .hypothesis
