"""What the cloud machines run: the pinned PyTorch build, the base image, how the project
is installed, and which registries need a login.

One set of pins serves the SkyPilot training VMs, the Ray batch cluster and the
Dockerfile (a test checks that the Dockerfile says the same and that pyproject allows
it).

The torch pin is the V100 cliff. V100s are compute capability 7.0 (sm_70): PyTorch's
CUDA 12.8 builds from 2.11 on and its CUDA 13 builds carry no sm_70 kernels; its CUDA
12.6 builds still do, and PyTorch plans to stop publishing cu126 wheels after torch
2.14. So the cloud installs the cu126 build of the torch version CI tests on CPU, and
that version must stay <= 2.14 for as long as the project runs on V100s (a test holds
it there); moving past it means leaving V100s for newer GPUs.
"""

from __future__ import annotations

import re
import shlex

TORCH_VERSION = "2.13.0"
"""torch on the cloud machines: the version ./dev installs (CPU build) for CI."""

TORCH_CUDA = "cu126"
"""The CUDA flavour of the torch wheel: the newest whose kernels still include sm_70."""

TORCH_LAST_WITH_SM70 = (2, 14)
"""The last torch release for which PyTorch plans cu126 wheels (the last with V100 kernels)."""

TORCH_INDEX_URL = f"https://download.pytorch.org/whl/{TORCH_CUDA}"
"""PyTorch's own wheel index for that flavour (PyPI's torch wheels are another CUDA build)."""

RAY_VERSION = "2.60.0"
"""Ray on the batch cluster. Ray's job client and cluster launcher must be the version
the cluster runs: pyproject pins the submitting side to the same (a test compares them)."""

BASE_IMAGE = "ubuntu:22.04"
"""Base of the Dockerfile. A plain OS image: the cu126 torch wheel brings its own CUDA
runtime, cuDNN, cuBLAS and NCCL as pip packages, and the NVIDIA driver comes from the
host (the container runs with ``--gpus all``). A CUDA runtime base image would carry a
second copy of those libraries, several GB pulled again on every spot relaunch."""

PYTHON = "python3.10"
"""The interpreter of the Docker image (Ubuntu 22.04's python3); pyproject needs >= 3.10."""

VENV = "$HOME/sr-venv"
"""Where setup installs the project on a VM (as written in shell scripts)."""

IMAGE_VENV = "/opt/sr-venv"
"""Where the Docker image holds the project's environment; setup links ``VENV`` to it."""

ARTIFACT_REGISTRY_SUFFIX = "-docker.pkg.dev"
"""Docker hosts of Google's Artifact Registry: ``LOCATION-docker.pkg.dev``."""


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


def docker_image(image_id: str) -> str:
    """The Docker image of a SkyPilot ``image_id`` (``docker:REF``, or a REF whose first
    component is a registry host such as ``us-central1-docker.pkg.dev/...``), or "" for a
    VM image (``projects/P/global/images/...``) or none."""
    if image_id.startswith("docker:"):
        return image_id.removeprefix("docker:")
    first = image_id.split("/", 1)[0]
    if "/" in image_id and ("." in first or ":" in first):
        return image_id
    return ""


def split_image(image: str) -> tuple[str, str, str]:
    """``(host, repository path, tag or digest)`` of a Docker image reference (a
    ``docker:`` prefix, SkyPilot's, is dropped). The host is empty for Docker Hub
    names (``ubuntu:22.04``, ``user/name:tag``): a first component is a host only when
    it has a dot or a port, or is ``localhost``, as Docker reads it."""
    ref = image.removeprefix("docker:")
    first, _, rest = ref.partition("/")
    host = ""
    if rest and ("." in first or ":" in first or first == "localhost"):
        host, ref = first, rest
    if "@" in ref:
        path, _, tag = ref.partition("@")
    else:
        path, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    digest = "@" in ref
    if (not path or not tag or (host and not _HOST.match(host)) or not _PATH.match(path)
            or not (_DIGEST if digest else _TAG).match(tag)):
        shown = repr(image) if len(image) <= 120 else repr(image[:120]) + "..."
        raise ValueError(f"--image {shown}: not a Docker image reference (HOST/PATH:TAG, lowercase path)")
    return host, path, tag


# Docker's reference grammar (distribution/reference): the parts reach YAML, `gcloud auth
# configure-docker HOST` and the fix lines `sr cloud doctor` prints.
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]+)?$")
_PATH = re.compile(r"^[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+([+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")


def is_artifact_registry(host: str) -> bool:
    """Google's Artifact Registry, whose images the VMs pull with their own service
    account (after ``gcloud auth configure-docker HOST``), no password involved."""
    return host.endswith(ARTIFACT_REGISTRY_SUFFIX)


def artifact_registry_location(host: str) -> str:
    """``us-central1`` for ``us-central1-docker.pkg.dev`` (multi-regions: ``us``, ``europe``...)."""
    return host.removesuffix(ARTIFACT_REGISTRY_SUFFIX)
