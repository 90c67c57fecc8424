# cpm2 serving image: `cpm2 serve` on 0.0.0.0:8080, every setting from CPM2_* variables (README).
#
#   docker build -t cpm2 .                       # CUDA build of torch from PyPI (GPU hosts)
#   docker build -t cpm2 --build-arg TORCH_SPEC=torch==2.13.0 \
#       --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only (1402 MB measured, demo model included)
#   docker run -p 8080:8080 -v $PWD/models:/models:ro -v cpm2-prompts:/data/prompts \
#       -e CPM2_MODEL=/models/my-model cpm2
#
# Models are mounted read-only at /models; soft prompts uploaded at runtime live on the
# /data/prompts volume (share it between replicas). The demo model (models/demo, 22.5 MB, its task
# prompts served read-only from it) and the random built-in one are in the image, so it
# also starts with nothing mounted and a read-only root (torch insists on its cache directory
# existing, even unused: it is made here too).

ARG DEBIAN=debian:bookworm-slim

FROM ${DEBIAN} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ARG TORCH_SPEC="torch>=2.4"
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
WORKDIR /src
# The versions the test suite passed with (`make lock`); torch comes from TORCH_SPEC.
COPY constraints.txt ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -c constraints.txt "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY cpm2 cpm2
COPY engine engine
COPY server server
COPY training training
RUN /opt/venv/bin/python -m pip install -c constraints.txt ".[server,detect]"
# The built-in default model, written once here so a read-only container never writes it.
RUN CPM2_CACHE_DIR=/opt/cpm2/cache /opt/venv/bin/cpm2 info --model builtin:tiny >/dev/null
COPY models/demo /opt/cpm2/models/demo

FROM ${DEBIAN}
# tini as PID 1: forwards SIGTERM to the server (which drains) and reaps any child.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 cpm2 \
 && useradd --uid 10001 --gid 10001 --home-dir /home/cpm2 --create-home --shell /usr/sbin/nologin cpm2 \
 && mkdir -p /models /data/prompts /home/cpm2/.cache/torchinductor \
 && chown -R 10001:10001 /data/prompts /home/cpm2
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cpm2 /opt/cpm2
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/home/cpm2/.cache \
    TORCHINDUCTOR_CACHE_DIR=/home/cpm2/.cache/torchinductor \
    CPM2_HOST=0.0.0.0 \
    CPM2_PORT=8080 \
    CPM2_MODEL=/opt/cpm2/models/demo \
    CPM2_CACHE_DIR=/opt/cpm2/cache \
    CPM2_PROMPT_STORE=/data/prompts
VOLUME ["/data/prompts"]
USER 10001:10001
WORKDIR /home/cpm2
EXPOSE 8080
# /health fails when the engine loop stops stepping while it has work (hang detection).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CPM2_PORT', '8080'), timeout=4)"]
# Drain takes up to CPM2_SHUTDOWN_TIMEOUT (30 s): give `docker stop -t` / the pod's grace period more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["cpm2", "serve"]
