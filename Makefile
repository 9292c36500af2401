# Two entry points a new user needs: `make train` (the main job on the embedded default) and `make test`.
# Both create .venv on first use from the lock in requirements/ (exact versions: a new release of a dependency
# cannot change what these commands install). `make train` installs requirements/train.txt, `make test` adds the
# test extras (requirements/test.txt: Triton, transformers, MPI, pytest). `make lock` refreshes the lock.
# The lock's torch is the CPU build; on a GPU machine set TORCH_SPEC to your cluster's CUDA torch, or install
# megapix into your own environment with setup.py's ranges (pip install -e '.[gpu,mpi]').
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed over the lock's torch when set, e.g. TORCH_SPEC=torch==2.13.0 PIP_ARGS="--index-url <your CUDA wheels>"
TORCH_SPEC ?=
# Extra pip flags for every install (an index or a wheel folder of your own)
PIP_ARGS ?=
OUT ?= runs/digits
# A second run on the same machine needs its own rendezvous port: make train PORT=29600
PORT ?=
RUN := PATH=$(abspath $(VENV))/bin:$$PATH
PIP := $(PY) -m pip install -q $(PIP_ARGS)

.PHONY: train test test-slurm test-fast venv venv-test lock clean

# pip itself comes from the lock first; megapix's editable install builds with the locked setuptools (in isolation:
# the venv's own packages stay out of the build).
$(VENV)/.installed-train: requirements/train.txt setup.py
	python3 -m venv $(VENV)
	$(PIP) "$$(grep '^pip==' requirements/train.txt)"
	$(PIP) -r requirements/train.txt
	$(if $(TORCH_SPEC),$(PIP) "$(TORCH_SPEC)")
	$(PIP) --no-deps --build-constraint requirements/train.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-train requirements/test.txt
	$(PIP) -r requirements/test.txt
	$(if $(TORCH_SPEC),$(PIP) "$(TORCH_SPEC)")
	touch $@

venv: $(VENV)/.installed-train
venv-test: $(VENV)/.installed-test

train: $(VENV)/.installed-train
	$(RUN) deepspeed $(if $(PORT),--master_port $(PORT)) megapix/train.py --config configs/tiny_digits.yaml --out $(OUT)

# Everything but the SLURM tier: the linter (ruff.toml), the main process (its 40 slowest tests listed at the end:
# where the time goes), then the Triton interpreter tests in a process of their own
# (TRITON_INTERPRET must be set before triton is imported, and must not reach the other tests).
test: $(VENV)/.installed-test
	$(RUN) $(PY) -m ruff check megapix kernels tests benchmarks
	$(RUN) $(PY) -m pytest -q --durations=40 -m "not triton_interp and not slurm" tests
	$(RUN) TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton_interp tests

# The SLURM tier: real slurmctld/slurmd jobs on one node and on two network-namespace nodes (marker `slurm`). Needs
# root and the packages scripts/install_slurm.sh installs; each test skips with the reason where they are missing.
# CI (.ci/run) runs it after make test.
test-slurm: $(VENV)/.installed-test
	$(RUN) $(PY) -m pytest -q --durations=20 -m slurm tests

# The unit tests only (no multi-process or subprocess training runs): the edit-test loop.
test-fast: $(VENV)/.installed-test
	$(RUN) $(PY) -m pytest -q -m "not slow and not triton_interp" tests

# Refresh the lock to the newest releases and run the fast tests on it in a fresh venv (scripts/lock.sh).
lock:
	bash scripts/lock.sh

clean:
	rm -rf runs .pytest_cache
