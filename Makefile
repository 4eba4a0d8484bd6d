# Front door: `make demo` and `make test` are all a fresh machine needs.
# Each target creates .venv (python3 -m venv) if it is missing and installs what it needs once;
# stamp files under .venv remember what was installed (they are redone when pyproject.toml
# changes). `make bench` is for the GPU machine; without a GPU it says so and exits 0.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip install --disable-pip-version-check
# torch is pinned: on the CPU machines this takes the local CPU wheel instead of a CUDA build.
TORCH  ?= torch==2.13.0
# Plain `jax` is the CPU build. On a GPU machine pass e.g. JAX='jax[cuda13]'.
JAX    ?= jax
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-demo: pyproject.toml | $(VPY)
	$(PIP) -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(VPY)
	$(PIP) -e '.[test]' $(TORCH) $(JAX)
	touch $@ $(VENV)/.stamp-demo

$(VENV)/.stamp-bench: pyproject.toml | $(VPY)
	$(PIP) -e '.[bench]' $(TORCH)
	touch $@ $(VENV)/.stamp-demo

demo: $(VENV)/.stamp-demo
	$(VPY) -m hisa_cupy demo

test: $(VENV)/.stamp-test
	$(VPY) -m pytest -m "not gpu" -q $(PYTEST_ARGS)

# BENCH_ARGS is passed to bench/kernels.py (e.g. BENCH_ARGS=--targets). On a GPU machine that
# has torch, CuPy and matplotlib but no network, skip the venv: make bench BENCH_PY=python3.
bench:
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "make bench: no NVIDIA GPU on this machine; the benchmark runs on an H100/H200 (nothing to do)."; \
	elif [ -n "$(BENCH_PY)" ]; then \
		$(BENCH_PY) bench/kernels.py $(BENCH_ARGS); \
	else \
		$(MAKE) --no-print-directory $(VENV)/.stamp-bench && $(VPY) bench/kernels.py $(BENCH_ARGS); \
	fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
