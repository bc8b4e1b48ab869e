# Two commands do everything on a fresh machine:
#   make demo   builds .venv, installs sparsecore, runs the main job (writes demo-output/)
#   make test   builds .venv, installs sparsecore with its test tools, runs the suite
# A machine without torch gets torch 2.13.0 (the CPU build where pip's index offers it, as on CI). To reuse a torch you
# already have, run: make VENV_FLAGS=--system-site-packages test
# Tests run the Triton kernel in Triton's CPU interpreter (TRITON_INTERPRET=1); on a
# GPU machine, run the kernels for real with: make test TRITON_INTERPRET=0
# triton 3.6's interpreter turns 1-element arrays into ints, which NumPy 2.4 refuses:
# the test environment pins numpy<2.4 (the library itself takes any numpy >= 1.24).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TRITON_INTERPRET ?= 1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,viz]' triton==3.6.0 'numpy<2.4' diffusers==0.42.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsecore demo --out demo-output

test: $(STAMP)
	TRITON_INTERPRET=$(TRITON_INTERPRET) HYPOTHESIS_PROFILE=ci $(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-enable --benchmark-json=bench/results/cpu-latest.json

clean:
	rm -rf $(VENV) demo-output .pytest_cache .hypothesis
