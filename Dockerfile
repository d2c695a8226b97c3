# fused_adamw: build the wheel with the CUDA kernels in a -devel image, then install it with
# torch into a small runtime image whose default command runs the demo.
#
#   docker build -t fused-adamw .
#   docker run --gpus all fused-adamw
#
# A docker build sees no GPU, so the arch list is explicit (never probed): override with
# --build-arg FUSED_ADAMW_CUDA_ARCHS="90".
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${CUDA_IMAGE} AS build
ARG FUSED_ADAMW_CUDA_ARCHS="80;86;89;90;100;120"
ENV FUSED_ADAMW_CUDA_ARCHS=${FUSED_ADAMW_CUDA_ARCHS} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv /venv \
    && /venv/bin/pip install "build==1.6.1" \
    && /venv/bin/python -m build --wheel --outdir /wheels .

FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch's CUDA wheels carry their own CUDA libraries and fused_adamw links the CUDA runtime
# statically, so the runtime image needs only the driver, which the container toolkit mounts.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
RUN useradd --create-home --uid 10001 app
USER 10001
WORKDIR /home/app
CMD ["python", "-m", "fused_adamw.demo"]
