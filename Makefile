# Two entry points a new user needs: `make train` (the main job on the embedded default) and `make test`.
# Both create .venv on first use: `make train` installs only what training needs, `make test` adds the test
# extras (triton, transformers, mpich, pytest). CPU installs pin torch (a bare `torch` pulls a multi-GB CUDA
# build); on a GPU machine install your CUDA torch first and set TORCH_SPEC accordingly.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/digits
# A second run on the same machine needs its own rendezvous port: make train PORT=29600
PORT ?=
RUN := PATH=$(abspath $(VENV))/bin:$$PATH

.PHONY: train test test-fast clean

$(VENV)/.installed-train: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-train
	$(PY) -m pip install -q -e '.[test]'
	touch $@

train: $(VENV)/.installed-train
	$(RUN) deepspeed $(if $(PORT),--master_port $(PORT)) megapix/train.py --config configs/tiny_digits.yaml --out $(OUT)

# Everything: the linter (ruff.toml), the main process, then the Triton interpreter tests in a process of their own
# (TRITON_INTERPRET must be set before triton is imported, and must not reach the other tests).
test: $(VENV)/.installed-test
	$(RUN) $(PY) -m ruff check megapix kernels tests benchmarks
	$(RUN) $(PY) -m pytest -q -m "not triton_interp" tests
	$(RUN) TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton_interp tests

# The unit tests only (no multi-process or subprocess training runs): the edit-test loop.
test-fast: $(VENV)/.installed-test
	$(RUN) $(PY) -m pytest -q -m "not slow and not triton_interp" tests

clean:
	rm -rf runs .pytest_cache
