"""What the cloud machines run: the pinned PyTorch build and how the project is installed.

One set of pins serves the SkyPilot training VMs, the Ray batch cluster and the
Dockerfile (a test checks that the Dockerfile says the same and that pyproject allows
it). V100s are compute capability 7.0 (sm_70): PyTorch's CUDA 12.8 builds from 2.11 on
and its CUDA 13 builds carry no sm_70 kernels, its CUDA 12.6 builds still do, so the
cloud environment installs the cu126 build of the same torch version CI tests on CPU.
"""

from __future__ import annotations

import shlex

TORCH_VERSION = "2.13.0"
"""torch on the cloud machines: the version ./dev installs (CPU build) for CI."""

TORCH_CUDA = "cu126"
"""The CUDA flavour of the torch wheel: the newest whose kernels still include sm_70."""

TORCH_INDEX_URL = f"https://download.pytorch.org/whl/{TORCH_CUDA}"
"""PyTorch's own wheel index for that flavour (PyPI's torch wheels are another CUDA build)."""

RAY_VERSION = "2.60.0"
"""Ray on the batch cluster: the cluster launcher and job client need the same version as
the machine submitting (the one the tests run)."""

CUDA_IMAGE = "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04"
"""Base of the Dockerfile: CUDA 12.6 runtime libraries matching the cu126 torch wheel."""

PYTHON = "python3.10"
"""The interpreter of the Docker image (Ubuntu 22.04's python3); pyproject needs >= 3.10."""

VENV = "$HOME/sr-venv"
"""Where setup installs the project on a VM (as written in shell scripts)."""

IMAGE_VENV = "/opt/sr-venv"
"""Where the Docker image holds the project's environment; setup links ``VENV`` to it."""


def install_script(extra: str, also: tuple[str, ...] = ()) -> str:
    """Bash lines that install the project (checked out in the current directory) with
    ``extra`` (and the requirements ``also``) into ``VENV``, the cu126 torch first, then
    fail unless that torch has sm_70 kernels. Idempotent: a node that already has the
    environment (a restarted managed job, a VM from our Docker image) skips the slow parts."""
    also_words = "".join(" " + shlex.quote(a) for a in also)
    return f"""\
set -euo pipefail
SR_VENV="${{SR_VENV:-{VENV}}}"
if [ ! -e "$SR_VENV" ] && [ -x {IMAGE_VENV}/bin/python ]; then
  # Our Docker image already holds torch and the dependencies.
  ln -s {IMAGE_VENV} "$SR_VENV"
fi
if [ ! -x "$SR_VENV/bin/python" ]; then
  python3 -m venv "$SR_VENV"
  "$SR_VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if ! "$SR_VENV/bin/python" -c "import torch; assert torch.__version__.startswith('{TORCH_VERSION}+{TORCH_CUDA}')" 2>/dev/null; then
  # Torch first, from PyTorch's {TORCH_CUDA} index: the project's torch>=... is then satisfied
  # and pip does not replace it with PyPI's build.
  "$SR_VENV/bin/python" -m pip install --quiet "torch=={TORCH_VERSION}" --index-url {TORCH_INDEX_URL}
fi
"$SR_VENV/bin/python" -m pip install --quiet -e ".[{extra}]"{also_words}
"$SR_VENV/bin/python" -c "import torch; archs = torch.cuda.get_arch_list(); assert 'sm_70' in archs, f'torch {{torch.__version__}} has no sm_70 (V100) kernels: {{archs}}'"
"""
