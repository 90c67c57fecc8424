# One target per job. Every target installs what it needs first (into .venv), so each works on a
# fresh clone: `make serve`, `make test`, `make lint`, `make bench`.
#
# CPU machines pin the CPU build of torch (TORCH_SPEC); GPU hosts run `make install TORCH_SPEC=torch`
# (or any CUDA build) — pyproject.toml keeps the torch range open for them.
#
# Installs take every other version from the lock (LOCK, pip constraints written by `make lock` from a
# green run), so a new release of any dependency cannot break a fresh clone; pyproject.toml keeps
# open ranges for users. torch is not in the lock: TORCH_SPEC says which build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= server,training,test
LOCK ?= constraints.txt
# Every extra, so the lock pins whatever a target installs.
LOCK_EXTRAS ?= server,training,test,cpm2,reference
LOCK_VENV ?= .venv-lock

.PHONY: install serve demo-model test lint format bench soak image clean lock

# TGI's client caps huggingface-hub<1.0, which transformers 5 cannot use; it runs on hub 2.x, so the
# test install takes it without its dependency pins (see the test extra in pyproject.toml).
TGI_CLIENT ?= text-generation>=0.7

# torch comes through pip, which sees the CPU build (uv would resolve the CUDA one); the rest through
# uv, which installs the locked set in about a tenth of pip's time and keeps the torch it finds.
# INSTALLER=pip uses pip throughout (a private index configured for pip only, for example).
INSTALLER ?= uv
ifeq ($(INSTALLER),uv)
INSTALL = $(VENV)/bin/uv pip install --python $(PY) --quiet -c $(LOCK)
else
INSTALL = $(PY) -m pip install --quiet -c $(LOCK)
endif

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH_SPEC)" $(if $(filter uv,$(INSTALLER)),uv)
	$(INSTALL) -e ".[$(EXTRAS)]"
	$(if $(findstring test,$(EXTRAS)),$(INSTALL) --no-deps "$(TGI_CLIENT)")
	touch $@

install: $(VENV)/.installed

# The demo model in git (models/demo, its task prompts preloaded) unless CPM2_MODEL or SERVE_ARGS
# (e.g. --model DIR --port 9000) says otherwise.
DEMO_MODEL ?= models/demo
# A development server: prompt writes from this machine need no token (--allow-local-admin trusts every
# loopback peer, and the server says so at start); once CPM2_ADMIN_TOKEN is set, the token is required.
serve: install
	$(VENV)/bin/cpm2 serve $(if $(CPM2_MODEL),,--model $(DEMO_MODEL)) --allow-local-admin $(SERVE_ARGS)

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

# Refresh the lock: the newest releases pyproject.toml allows, in a fresh venv; the suite and the
# linters run there, and only if they pass is LOCK rewritten (then commit it).
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) lint test VENV=$(LOCK_VENV) LOCK=/dev/null EXTRAS=$(LOCK_EXTRAS)
	{ echo "# pip constraints: the versions \`make lint test\` passed with ($$(date -u +%F), \`make lock\`)."; \
	  echo "# torch is chosen by TORCH_SPEC, not here. Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())')."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|cpm2)(==| @)'; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
