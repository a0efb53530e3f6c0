# syntax=docker/dockerfile:1
# The Tandem image (router, workers and the `tandem` CLI); the Helm chart's default image.
#   docker build -t tandem-serve:0.1.0 .                                   # CPU (torch CPU wheel)
#   docker build -t tandem-serve:0.1.0-cuda --build-arg VARIANT=cuda .     # CUDA (torch + the [gpu] extra)
# The chart runs `python -m router` / `python -m services.worker`; the entrypoint is the CLI.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- bases: a Python, the non-root user, nothing else -------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# g++ builds the CPU kernel module on first use, in the best ISA variant this CPU runs (avx512_bf16,
# avx512, avx2 or scalar, each with explicit flags, not -march=native); without g++ the engine falls
# back to the pure-torch path. libtcmalloc-minimal4: workers re-execute under tcmalloc
# (services/allocator.py; faster steps than glibc malloc).
# Not pinned: the base image's Debian release fixes the versions; pinning breaks on its point releases.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid tandem --create-home --home-dir /home/tandem --shell /usr/sbin/nologin tandem

FROM ${CUDA_IMAGE} AS base-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11). CUDA libraries come from the torch wheel's
# nvidia-* dependencies and the base; the driver from the host.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid tandem --create-home --home-dir /home/tandem --shell /usr/sbin/nologin tandem

# ---- builder: a venv with torch and the project ---------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN python -m venv /opt/venv
COPY constraints.txt ./
# torch first, in its own layer: it is most of the image and changes least.
RUN if [ "$VARIANT" = cpu ]; then \
      pip install --index-url "$TORCH_CPU_INDEX" --constraint constraints.txt "torch==${TORCH_VERSION}"; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi
COPY . .
# Editable: the kernel source (services/engine/csrc) is read from the tree at run time and is not
# package data, so /app is copied to the runtime image as it is and the venv points at it.
RUN if [ "$VARIANT" = cpu ]; then \
      pip install --constraint constraints.txt -e . ; \
    else \
      pip install -e ".[gpu]"; \
    fi \
 && python -c "import tandem, router, services.worker"

# ---- runtime ----------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/tandem \
    XDG_CACHE_HOME=/cache \
    TANDEM_KERNEL_CACHE=/cache/tandem-kernels
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
WORKDIR /app
# /cache and /tmp are emptyDir mounts in the chart (read-only root filesystem); created here for `docker run`.
RUN mkdir -p /cache && chown tandem:tandem /cache
USER 10001:10001
# router gRPC, worker gRPC, worker KV data plane
EXPOSE 50051 50061 50062
ENTRYPOINT ["tandem"]
CMD ["--help"]
