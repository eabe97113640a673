# syntax=docker/dockerfile:1
# turngate: the proxy with the shipped default critic baked in (critic_models/default/ is package data).
#
#   docker build -t turngate .                                   # CPU image (default)
#   docker build -t turngate:gpu --build-arg VARIANT=gpu .       # onnxruntime-gpu on a CUDA runtime base
#
# Both variants: a build stage installs the package into /opt/venv with the README's `pip install .`,
# the runtime stage copies that venv onto the same base, adds nothing else and runs as a non-root user.

ARG VARIANT=cpu
# onnxruntime-gpu's PyPI wheels are built for CUDA 13 and cuDNN 9 (1.31.1 links libcublasLt.so.13 and
# libcudart.so.13): on a CUDA 12 base the CUDA provider does not load and the critic runs on the CPU.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- bases: the same image for building and running, so the venv's interpreter path matches ----
FROM python:3.12-slim-bookworm AS base-cpu
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-gpu
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# ---- build ----
FROM base-${VARIANT} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . /src
RUN pip install .
# GPU: onnxruntime-gpu replaces the CPU wheel (both ship the `onnxruntime` module).
RUN if [ "$VARIANT" = "gpu" ]; then \
      pip install ".[gpu]" \
      && pip uninstall -y onnxruntime \
      && pip install --force-reinstall --no-deps "onnxruntime-gpu==1.31.1"; \
    fi
# Alembic's migrations ship inside the package (setup.py), so `turngate db upgrade` works from /app.
RUN mkdir -p /app \
 && python -c "import critic_models, service.store.migrate as m; print('turngate installed,', m.migrations_dir())"

# ---- runtime ----
FROM base-${VARIANT} AS runtime
LABEL org.opencontainers.image.title="turngate" \
      org.opencontainers.image.description="OpenAI-compatible proxy that gates every agent turn with a trained critic" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 turngate \
 && useradd --system --uid 10001 --gid turngate --home-dir /app --shell /usr/sbin/nologin turngate \
 && mkdir -p /app /var/lib/turngate/spool \
 && chown -R turngate:turngate /app /var/lib/turngate
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=turngate:turngate /app /app
WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    TURNGATE_DATABASE_URL=sqlite:////var/lib/turngate/turngate.db \
    TURNGATE_SPOOL_DIR=/var/lib/turngate/spool
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["turngate"]
# One worker by default, for the embedded SQLite database; compose and Kubernetes run two workers
# against Postgres (migrated beforehand).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"]
