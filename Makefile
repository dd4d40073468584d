# `make demo` and `make test` each create .venv and install the project when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fnl-installed
# pip on these machines takes this pair from the local disk; timm needs torchvision
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean mutate

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[timm,fairseq,onnx,dev]" $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fnl_timm.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_core.py

# Mutation testing (mutmut, configured in pyproject.toml; not part of `make test`): hours on 2 cores.
# One file: `make mutate FILE=fnl/linear.py`; MUTATE_JOBS workers (default 1). Survivors: `$(VENV)/bin/mutmut results`.
MUTATE_JOBS ?= 1
mutate: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(if $(FILE),"$(subst /,.,$(basename $(FILE))).*")

clean:
	rm -rf $(VENV) *.egg-info
