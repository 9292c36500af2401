# Two entry points a new user needs: `make train` (the main job on the embedded default) and `make test`.
# Both create .venv on first use. CPU installs pin torch (a bare `torch` pulls a multi-GB CUDA build);
# on a GPU machine install your CUDA torch first and set TORCH_SPEC accordingly.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/digits

.PHONY: train test bench clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

train: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed megapix/train.py --out $(OUT)

test: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
