# syntax=docker/dockerfile:1
# One image for training, evaluation, visualisation and the Gradio demo (the default command).
#
#   docker build -t hybrid-vit-cifar10 .                                  # CPU (default)
#   docker build --build-arg TORCH=cuda -t hybrid-vit-cifar10:gpu .       # NVIDIA GPU
#
# CPU and GPU images share the same Debian Python base and differ only in the torch wheels:
#   TORCH=cpu   the CPU-only wheels from PyTorch's CPU index, a fraction of the CUDA ones' size.
#   TORCH=cuda  PyPI's Linux wheels, which are CUDA builds (CUDA 13 for torch 2.14) that
#               carry their own CUDA runtime, cuBLAS and cuDNN as pip packages. The container
#               then needs only the host's NVIDIA driver (one that supports CUDA 13), which
#               the NVIDIA Container Toolkit mounts in with `docker run --gpus all`; an
#               nvidia/cuda base image would duplicate those libraries and bring a Python
#               other than 3.11. Several GB.
# The torch stages are chosen by name, so BuildKit (the default builder since Docker 23)
# builds only the one asked for.
ARG TORCH=cpu

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS torch-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

FROM base AS torch-cuda
RUN pip install torch==2.14.1 torchvision==0.29.1

FROM torch-${TORCH} AS app
WORKDIR /app
# The project's dependencies, and gradio for the demo. torch is already installed and
# satisfies pyproject's range, so pip keeps it.
COPY pyproject.toml README.md configuration_hybrid_vit.py modeling_hybrid_vit.py ./
RUN pip install ".[demo]" && rm -rf build *.egg-info
COPY *.py default.yaml ./
COPY configs/ configs/
COPY assets/ assets/

# A non-root user. Runs with `--user "$(id -u):$(id -g)"`, so that files written into a
# mounted folder belong to the host user, are some uid without a home of its own; so HOME,
# where Hugging Face and matplotlib keep their caches, is /cache for every uid,
# and it and /app/outputs are writable by all (sticky, like /tmp).
RUN useradd --uid 1000 --home-dir /cache --no-create-home user \
    && mkdir -p /app/outputs /cache \
    && chmod 1777 /app/outputs /cache
USER user
ENV HOME=/cache \
    HF_HOME=/cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_ANALYTICS_ENABLED=False \
    HYBRID_VIT_MODEL=/app/outputs/hybrid-vit-cifar10

# The demo, on the model that training writes by default (an absolute path, so that a
# missing mount reads "model folder not found" rather than a failed Hub lookup).
EXPOSE 7860
CMD ["python", "app.py"]
