# sr-cloud image for V100 machines: CUDA 12.6 runtime, PyTorch's cu126 build (the newest
# CUDA flavour whose kernels include V100's sm_70) and the project with its training and
# batch dependencies. The same image serves SkyPilot training VMs (`sr cloud train
# --image docker:...`) and Ray cluster nodes (`sr cloud ray-config --image ...`).
# Versions here must match infra/image.py and pyproject.toml (tests/test_cloud.py checks).
#
#   docker build -t sr-cloud:0.1.0 .
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu126
ARG RAY_VERSION=2.60.0

LABEL org.opencontainers.image.title="sr-cloud" \
      org.opencontainers.image.version="0.1.0"

# Python 3.10 is Ubuntu 22.04's (the project needs >= 3.10); rsync and ssh are what Ray's
# cluster launcher uses to reach a container; libgl1/libglib2.0-0 for OpenCV.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3.10 python3.10-venv python3-pip rsync openssh-client sudo curl ca-certificates \
       libgl1 libglib2.0-0 \
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
