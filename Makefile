# One target per job. Every target installs what it needs first (into .venv), so each works on a
# fresh clone: `make serve`, `make test`, `make lint`, `make bench`.
#
# CPU machines pin the CPU build of torch (TORCH_SPEC); GPU hosts run `make install TORCH_SPEC=torch`
# (or any CUDA build) — pyproject.toml keeps the torch range open for them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= server,training,test

.PHONY: install serve demo-model test lint format bench soak image clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The demo model in git (models/demo, its task prompts preloaded) unless CPM2_MODEL or SERVE_ARGS
# (e.g. --model DIR --port 9000) says otherwise.
DEMO_MODEL ?= models/demo
serve: install
	$(VENV)/bin/cpm2 serve $(if $(CPM2_MODEL),,--model $(DEMO_MODEL)) $(SERVE_ARGS)

# Rebuild models/demo from scratch (tokenizer, dense multi-task pretraining, MoE upcycling, one prompt
# per task; under an hour on 2 CPU cores). Rerunning resumes; `rm -rf runs/demo` starts over.
demo-model: install
	$(VENV)/bin/cpm2 train demo --config training/configs/demo.yaml

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m bench.run_all

# 30 minutes of mixed load against a real server, watching its RSS and open fds (SOAK_ARGS="--minutes 5").
soak: install
	$(PY) -m bench.soak $(SOAK_ARGS)

# The serving image (Dockerfile) with docker, or podman where there is no docker engine.
# GPU hosts keep the default CUDA torch; CPU-only: make image IMAGE_ARGS="--build-arg TORCH_SPEC=torch==2.13.0
# --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu".
IMAGE ?= cpm2:latest
CONTAINER ?= $(shell if docker info >/dev/null 2>&1; then echo docker; else echo podman; fi)
image:
	$(CONTAINER) build -t $(IMAGE) $(IMAGE_ARGS) .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
