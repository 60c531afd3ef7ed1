# `make book` creates .venv if needed, installs rmsae with all extras, builds the demo reward models
# and SAEs (cached), executes the notebooks of the experiment matrix (experiments.yml) for PROFILE,
# and renders the Jupyter Book into _build/html. `make test` runs the tests.
# TORCH_SPEC pins the CPU build of PyTorch that lies on disk on the project's machines; on a GPU
# machine, set TORCH_SPEC="torch>=2.6" to take the CUDA build instead.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= demo
JOBS ?= 1
SHARED_DATA := $(abspath ../shared/data)

export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
# With the local data copies beside the repository (the project's offline machines), read them and
# do not try the hub; elsewhere the data comes from the hub.
ifneq ($(wildcard $(SHARED_DATA)/hh-rlhf),)
export RMSAE_DATA_DIR ?= $(SHARED_DATA)
export HF_HUB_OFFLINE ?= 1
endif

# tcmalloc keeps the memory of freed tensors for the next batch. With glibc's malloc, PyTorch's large
# CPU tensors go back to the kernel when freed, and each batch faults them back in as zeroed pages.
# On 2 AMD EPYC cores that was a quarter of the CPU time of demo RM training, and tcmalloc cut a
# training step from 2.90 s to 2.15 s (benchmarks/bench_rm_training.py). It is preloaded when
# Debian's libtcmalloc-minimal4 (or the same library elsewhere) is installed; TCMALLOC= turns it off.
TCMALLOC ?= $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4))
ifneq ($(TCMALLOC),)
ifeq ($(wildcard $(TCMALLOC)),)
$(warning TCMALLOC=$(TCMALLOC) is not a file; running without tcmalloc. Give the path of libtcmalloc_minimal.so.4, or TCMALLOC= to silence this.)
override TCMALLOC :=
endif
endif
ifneq ($(TCMALLOC),)
export LD_PRELOAD := $(TCMALLOC)$(if $(LD_PRELOAD), $(LD_PRELOAD))
# tcmalloc otherwise prints a line to stderr for every allocation above 1 GiB.
export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD ?= 1099511627776
endif

.PHONY: install book test benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet "$(TORCH_SPEC)" -e '.[all]'
	touch $@

book: install
	$(VENV)/bin/rmsae book --profile $(PROFILE) --jobs $(JOBS)

test: install
	$(VENV)/bin/python -m pytest

benchmark: install
	$(VENV)/bin/python benchmarks/bench_scoring.py
	$(VENV)/bin/python benchmarks/bench_steering.py
	$(VENV)/bin/python benchmarks/bench_rm_training.py

clean:
	rm -rf $(VENV) .pytest_cache _build runs
