# `make test` and `make demo` (and `make tune`, `make bench-cpu`) do all the set-up on a fresh machine:
# a virtual environment in .venv with the pinned CPU requirements and this package installed in
# editable mode, which also compiles the fast CPU update (also_fused/csrc; skipped without a C++
# compiler, and the CPU path then falls back to the reference).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo tune bench-cpu bench-dro bench-gpu clean

$(STAMP): setup.py requirements/cpu.txt also_fused/csrc/cpu_adam.cpp also_fused/csrc/cpu_pi.cpp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# everything, on both cores (what CI runs)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# between edits: every test but those marked slow (see pyproject.toml), about 5 minutes on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

demo: $(STAMP)
	$(PY) examples/demo_digits.py

tune: $(STAMP)
	$(PY) examples/tune_digits.py

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu/bench_cpu.py
	$(PY) -m pytest -q -p no:cacheprovider benchmarks/cpu/test_bench_cpu.py --benchmark-sort=name \
		--benchmark-columns=median,iqr,rounds --benchmark-json=benchmarks/results/cpu_pytest_benchmark.json

# the DRO benchmark's CPU tasks (long-tailed classes, spurious patch, colored digits, flipped labels):
# Optuna-tuned methods, 10 seeds, then attempts.py (settings tried for ALSO, AdamW's decay range, the colored task
# at 0.99); about 32 minutes on 2 cores; results, plots and tables in benchmarks/dro/results/. GPU task: benchmarks/dro/gpt_sources.py
bench-dro: $(STAMP)
	$(PY) benchmarks/dro/run_cpu.py
	$(PY) benchmarks/dro/attempts.py

# on a CUDA machine whose python3 has torch and triton: tests on the GPU, then the GPU benchmarks
bench-gpu:
	bash benchmarks/gpu_run.sh all

clean:
	rm -rf $(VENV) build *.egg-info also_fused/_cpu_adam*.so
