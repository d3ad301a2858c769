# moeserve image: `docker build -t moeserve .` (CPU, the default) or
# `docker build --build-arg DEVICE=cuda -t moeserve:cuda .` (CUDA). docker/compose.yaml builds both.
# The install steps are scripts/install.sh, the same script `make install` runs.
ARG DEVICE=cpu

# --- operating-system bases, one per device; DEVICE picks one -------------------------------------------------
FROM python:3.11-slim-bookworm AS os-cpu
ENV PYTHON=python3.11 \
    BUILD_PACKAGES= \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS os-cuda
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
# torch's default Linux wheels on PyPI are the CUDA builds: no extra index.
ENV PYTHON=python3.11 \
    BUILD_PACKAGES=python3.11-dev \
    TORCH_INDEX_URL=

# --- build: venv, dependencies, the compiled experts kernel ----------------------------------------------------
FROM os-${DEVICE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ $BUILD_PACKAGES \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/moeserve
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY configs ./configs
COPY scripts ./scripts
COPY docker/entrypoint.sh ./docker/entrypoint.sh
RUN VENV=/opt/moeserve/.venv EXTRAS= bash scripts/install.sh all

# --- runtime: the built tree, a non-root user, volumes, health check ---------------------------------------------
FROM os-${DEVICE} AS runtime
RUN useradd --create-home --uid 10001 --user-group moeserve \
    && mkdir -p /models /var/lib/moeserve/experts /var/lib/moeserve/traces \
    && chown moeserve:moeserve /models /var/lib/moeserve/experts /var/lib/moeserve/traces
COPY --from=build --chown=moeserve:moeserve /opt/moeserve /opt/moeserve
WORKDIR /opt/moeserve
ENV PATH=/opt/moeserve/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODEL_DIR=/models \
    DEMO_MODEL_IF_MISSING=1 \
    MOESERVE_HOST=0.0.0.0 \
    MOESERVE_PORT=8000 \
    MOESERVE_OFFLOAD_DIR=/var/lib/moeserve/experts
USER moeserve
VOLUME ["/models", "/var/lib/moeserve/experts", "/var/lib/moeserve/traces"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MOESERVE_PORT', '8000'), timeout=4)"
ENTRYPOINT ["/opt/moeserve/docker/entrypoint.sh"]
