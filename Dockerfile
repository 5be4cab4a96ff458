# syntax=docker/dockerfile:1
# The ARFlow training image: torch, the project with its extras, DeepSpeed with its ops compiled
# at build time, optionally flash-attn; `arflow` is the entry point and runs as a non-root user.
#
#   docker build -t registry.example.com/arflow:latest .
#   docker build --build-arg FLASH_ATTN=1 --build-arg MAX_JOBS=16 -t ...:flash .
#
# Two stages: `build` (a CUDA devel image: nvcc and headers compile DeepSpeed's ops and
# flash-attn) fills the virtual environment /opt/venv; `runtime` (the matching CUDA runtime
# image, without the toolkit) receives only that environment. The two base images must carry
# the same distribution release, so that /usr/bin/python3 is the same interpreter in both.
#
# Behind a TLS-intercepting proxy or with a private index, pass the pip configuration and the
# CA bundle as build secrets; they are mounted for the pip steps only and never stored in a layer:
#   docker build --secret id=pip_conf,src=$HOME/.config/pip/pip.conf \
#                --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...
# Local wheels (a torch build for another CUDA, a prebuilt flash-attn) come in as the extra
# build context `wheels`: --build-context wheels=DIR; pip looks there before any index.

ARG BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# Empty unless replaced by --build-context wheels=DIR.
FROM scratch AS wheels

FROM ${BUILD_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# The distribution's own Python and compiler, whatever its release: versions follow the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Optional secrets: a pip configuration (index URLs, credentials) and a CA bundle for pip.
# The step runs its arguments with both set when they were given.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && printf '%s\n' '#!/bin/sh' \
        '[ -f /run/secrets/pip_conf ] && export PIP_CONFIG_FILE=/run/secrets/pip_conf' \
        '[ -f /run/secrets/ca_bundle ] && export PIP_CERT=/run/secrets/ca_bundle' \
        'exec "$@"' > /usr/local/bin/with-pip-secrets \
    && chmod 755 /usr/local/bin/with-pip-secrets

# torch first: the largest layer, and DeepSpeed's build imports it. TORCH_INDEX_URL selects a
# CUDA flavour (e.g. https://download.pytorch.org/whl/cu128); empty means the configured index,
# whose default torch 2.14 build is for CUDA 13.0 like the base images above.
ARG TORCH_REQUIREMENT="torch==2.14.0"
ARG TORCH_INDEX_URL=""
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=pip_conf --mount=type=secret,id=ca_bundle \
    with-pip-secrets pip install --find-links /wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "$TORCH_REQUIREMENT" "setuptools>=77" "wheel>=0.43"

# The project's dependencies, DeepSpeed built from source with the ops named in DS_OPS
# (DS_BUILD_<OP>=1 each, checked after the build): FUSED_ADAM for CUDA; SHM_COMM is the op
# DeepSpeed's CPU backend would otherwise compile at every start (build with DS_ACCELERATOR=cpu).
# No GPU is needed: DS_ACCELERATOR and TORCH_CUDA_ARCH_LIST say what to build for.
ARG ARFLOW_EXTRAS=all
ARG DS_ACCELERATOR=cuda
ARG DS_OPS="FUSED_ADAM"
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0"
ARG MAX_JOBS=4
WORKDIR /src
COPY pyproject.toml LICENSE ./
COPY tools/container/check_ds_ops.py /usr/local/bin/check_ds_ops.py
# The metadata alone (no package yet, an empty README) installs the dependencies, so that
# editing the code or the README does not rebuild this layer; the package follows below.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=pip_conf --mount=type=secret,id=ca_bundle \
    for op in $DS_OPS; do export "DS_BUILD_${op}=1"; done \
    && touch README.md \
    && with-pip-secrets pip install --find-links /wheels --no-build-isolation ".[${ARFLOW_EXTRAS}]" \
    && python /usr/local/bin/check_ds_ops.py $DS_OPS

# flash-attn (compiled against the toolkit of the build image unless a matching wheel lies in
# the `wheels` context); off by default.
ARG FLASH_ATTN=0
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=pip_conf --mount=type=secret,id=ca_bundle \
    if [ "$FLASH_ATTN" = 1 ]; then \
        with-pip-secrets pip install --find-links /wheels --no-build-isolation ".[flash]" \
        && python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; \
    fi

COPY README.md ./
COPY arflow ./arflow
RUN pip install --no-build-isolation --no-deps . \
    && arflow --help > /dev/null

FROM ${RUNTIME_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# g++ and the Python headers stay: torch.compile (Inductor on CPU, Triton's launchers on GPU)
# compiles at run time. The CUDA toolkit of the build stage does not come along.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ python3 python3-dev \
    && rm -rf /var/lib/apt/lists/*

ARG ARFLOW_UID=10001
RUN useradd --create-home --uid "$ARFLOW_UID" --shell /bin/bash arflow \
    && mkdir /workspace && chown arflow:arflow /workspace
COPY --from=build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="arflow" \
      org.opencontainers.image.description="ARFlow training: arflow train / sample / evaluate, DeepSpeed ops prebuilt" \
      org.opencontainers.image.licenses="MIT"

USER ${ARFLOW_UID}
WORKDIR /workspace
ENTRYPOINT ["arflow"]
CMD ["--help"]
