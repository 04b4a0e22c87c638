# sr-cloud image for V100 machines: Ubuntu 22.04, PyTorch's cu126 build (the newest CUDA
# flavour whose kernels include V100's sm_70) and the project with its training and batch
# dependencies. The same image serves SkyPilot training VMs (`sr cloud train --image
# docker:...`) and Ray cluster nodes (`sr cloud ray-config --image ...`).
# Versions here must match infra/image.py and pyproject.toml (tests/test_cloud.py checks).
#
# The base is a plain OS image, not a CUDA one: the cu126 torch wheel installs its own
# CUDA runtime, cuDNN, cuBLAS and NCCL as pip packages, and the NVIDIA driver comes from
# the host (the container runs with --gpus all). A CUDA runtime base would add a second
# copy of those libraries, several GB pulled again on every spot relaunch.
#
# torch 2.13.0 is pinned on purpose: cu126 wheels are the last with V100 kernels, and
# PyTorch plans none after torch 2.14. Newer torch means leaving V100s.
#
#   gcloud auth configure-docker us-central1-docker.pkg.dev
#   docker build -t us-central1-docker.pkg.dev/PROJECT/sr/sr-cloud:0.1.0 .
#   docker push us-central1-docker.pkg.dev/PROJECT/sr/sr-cloud:0.1.0
FROM ubuntu:22.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu126
ARG RAY_VERSION=2.60.0

LABEL org.opencontainers.image.title="sr-cloud" \
      org.opencontainers.image.version="0.1.0"

# Python 3.10 is Ubuntu 22.04's (the project needs >= 3.10). rsync, ssh, sudo, curl, wget,
# patch, fuse and pip are what SkyPilot and Ray's cluster launcher install in a container
# they run in when it lacks them: here they are already, so a relaunch skips that step.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3.10 python3.10-venv python3-pip rsync openssh-client openssh-server sudo curl wget patch fuse \
       ca-certificates libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN python3.10 -m venv /opt/sr-venv
ENV PATH=/opt/sr-venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# torch first, from PyTorch's own index: pip then keeps it when the project asks for torch>=...
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
    && python -c "import torch; assert 'sm_70' in torch.cuda.get_arch_list(), torch.cuda.get_arch_list()"

WORKDIR /opt/sr-cloud
COPY pyproject.toml README.md ./
COPY sr_core sr_core
COPY jobs jobs
COPY batch batch
COPY infra infra
RUN pip install --no-cache-dir ".[train,batch]" "ray[default]==${RAY_VERSION}"

CMD ["sr", "--help"]
