"""Batch upscaling on a Ray cluster in Google Cloud, through Ray's own cluster launcher.

``cluster_config`` writes the launcher's YAML (a CPU head node and an autoscaling pool
of GPU workers that advertise ``{"GPU": K}``, so the batch job's GPU actors land on
them); ``submit_commands`` lists what ``sr cloud batch`` runs: ``ray up`` when the
cluster is not there, a port-forward to the head's job server, and ``ray job submit``
of ``sr batch``. Ray's validator (``ray.autoscaler._private.util.validate_config``)
accepts the config; nothing here talks to a cloud.

What the engines do not check, and the config therefore states: Ray's GCP provider
gives its service account (``ray-autoscaler-sa-v1``, with roles/storage.objectAdmin) to
the head only, and a worker VM created without ``serviceAccounts`` has no credentials,
so every worker node type names that account with the cloud-platform scope (as Ray's
GCP guide shows); with a Docker image from Artifact Registry, every node runs
``gcloud auth configure-docker HOST`` before the pull, and the GPU workers wait for the
NVIDIA driver the VM image installs on first boot (as Ray's GPU Docker example does).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from infra import image, shell

PROJECT_ON_NODES = "~/sr-cloud"
"""Where the launcher copies the project checkout on every node."""

DEFAULT_SOURCE_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
"""A Google Deep Learning VM image family (NVIDIA driver installed on first boot, which
covers V100s). Families are renamed over time: list the current ones with
``gcloud compute images list --project deeplearning-platform-release --no-standard-images``."""

DASHBOARD_PORT = 8265
"""The Ray job server (dashboard) port on the head."""

RAY_SERVICE_ACCOUNT_ID = "ray-autoscaler-sa-v1"
"""The service account Ray's cluster launcher creates and gives the head node."""

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
"""OAuth scopes of the nodes' service account: all APIs, limited by its IAM roles."""

WAIT_FOR_DRIVER = ("timeout 600 bash -c 'until nvidia-smi > /dev/null 2>&1; do sleep 5; done' || "
                   "{ echo 'no NVIDIA driver after 10 minutes' >&2; exit 1; }")
"""A GPU worker's first command: the VM image installs the driver on first boot."""

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


@dataclass
class ClusterSpec:
    """What ``sr cloud ray-config`` asks for."""

    project_id: str
    """GCP project that owns the VMs."""

    region: str = "us-central1"
    """GCP region."""

    zone: str = "us-central1-a"
    """GCP zone, inside ``region``; it must offer ``gpu``."""

    name: str = "sr-batch"
    """Cluster name (``ray up`` / ``ray down`` use it)."""

    gpu: str = "nvidia-tesla-v100"
    """GCP accelerator type of the workers."""

    gpus_per_worker: int = 1
    """GPUs per worker VM (each runs one upscaling actor per GPU)."""

    min_workers: int = 0
    """Workers kept up while idle."""

    max_workers: int = 4
    """Upper bound of the autoscaler."""

    spot: bool = False
    """Spot workers (about a third of the on-demand price; a lost worker's images are redone)."""

    cpus_per_gpu: int = 8
    """vCPUs per GPU on a worker (decoding and encoding run on them; PNG encoding is slow)."""

    head_machine_type: str = "n1-standard-8"
    """Head VM (the driver of the batch job, listing and scheduling; no GPU)."""

    disk_gb: int = 200
    """Boot disk of every node in GB."""

    source_image: str = DEFAULT_SOURCE_IMAGE
    """VM image of every node (must bring the NVIDIA driver on workers)."""

    docker_image: str = ""
    """Run every node inside this container image (the project's Dockerfile); empty: none."""

    project_dir: str = "."
    """The project checkout copied to every node."""

    worker_service_account: str = ""
    """Service account of the GPU workers (they read inputs and write outputs in the
    bucket); empty: Ray's own, ``ray-autoscaler-sa-v1@PROJECT.iam.gserviceaccount.com``."""


def service_account_email(project_id: str, account_id: str = RAY_SERVICE_ACCOUNT_ID) -> str:
    return f"{account_id}@{project_id}.iam.gserviceaccount.com"


def worker_machine_type(spec: ClusterSpec) -> str:
    """An N1 type with ``cpus_per_gpu`` vCPUs per GPU (V100s attach only to N1 VMs)."""
    return f"n1-standard-{spec.cpus_per_gpu * spec.gpus_per_worker}"


def check_spec(spec: ClusterSpec) -> None:
    if not spec.project_id:
        raise ValueError("no GCP project: pass --project or run `gcloud config set project PROJECT`")
    shell.check_match(shell.PROJECT, spec.project_id, "--project", "my-project-123")
    for option, value in (("--region", spec.region), ("--zone", spec.zone), ("--gpu", spec.gpu)):
        shell.check_match(shell.LOCATION, value, option, "us-central1, us-central1-a, nvidia-tesla-v100")
    if not _NAME.match(spec.name):
        raise ValueError(f"--name {shell.shown(spec.name)}: use 1-41 lowercase letters, digits and dashes, "
                         "starting with a letter")
    if not spec.zone.startswith(spec.region + "-"):
        raise ValueError(f"--zone {spec.zone} is not in --region {spec.region}")
    if spec.gpus_per_worker not in (1, 2, 4, 8):
        raise ValueError(f"--gpus-per-worker {spec.gpus_per_worker}: GCP attaches 1, 2, 4 or 8 GPUs to a VM")
    if spec.cpus_per_gpu not in (1, 2, 4, 8) or spec.cpus_per_gpu * spec.gpus_per_worker > 96:
        raise ValueError(f"--cpus-per-gpu {spec.cpus_per_gpu}: use 1, 2, 4 or 8 (an N1 VM has at most 96 vCPUs)")
    if spec.max_workers < 1 or not 0 <= spec.min_workers <= spec.max_workers:
        raise ValueError(f"need 0 <= --min-workers ({spec.min_workers}) <= --max-workers ({spec.max_workers}), max >= 1")
    if spec.disk_gb < 50:
        raise ValueError(f"--disk-gb {spec.disk_gb}: at least 50 GB (the CUDA environment alone takes ~15)")
    if spec.worker_service_account and not shell.EMAIL.match(spec.worker_service_account):
        raise ValueError(f"--service-account {shell.shown(spec.worker_service_account)}: give a service account's "
                         "email (NAME@PROJECT.iam.gserviceaccount.com)")
    if spec.docker_image:
        image.split_image(spec.docker_image)


def _disk(spec: ClusterSpec) -> list[dict]:
    return [{
        "boot": True,
        "autoDelete": True,
        "type": "PERSISTENT",
        "initializeParams": {"diskSizeGb": spec.disk_gb, "sourceImage": spec.source_image},
    }]


def cluster_config(spec: ClusterSpec, project_dir: str) -> dict:
    """The cluster launcher config, complete (every top-level field given, so the
    validator accepts it as written and ``ray up`` adds no surprises)."""
    check_spec(spec)
    ray_bin = f"{image.VENV}/bin/ray"
    install = image.install_script("batch", also=(f"ray[default]=={image.RAY_VERSION}",))
    login = registry_login_commands(spec.docker_image)
    config = {
        "cluster_name": spec.name,
        "max_workers": spec.max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "docker": {},
        "provider": {
            "type": "gcp",
            "region": spec.region,
            "availability_zone": spec.zone,
            "project_id": spec.project_id,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types(spec, login),
        "head_node_type": "head",
        "file_mounts": {PROJECT_ON_NODES: project_dir},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        # The checkout's .gitignore keeps virtualenvs and outputs out of the copy.
        "rsync_exclude": ["**/.git", "**/.git/**"],
        "rsync_filter": [".gitignore"],
        "initialization_commands": login,
        "setup_commands": [
            f"cd {PROJECT_ON_NODES} && bash -c {shell.word(install)}",
            # Later commands (ray start, the job's `sr batch`) find the environment first.
            'grep -qs sr-venv/bin ~/.bashrc || echo "export PATH=\\"\\$HOME/sr-venv/bin:\\$PATH\\"" >> ~/.bashrc',
        ],
        # The head's autoscaler creates GCP VMs through Google's API client.
        "head_setup_commands": [f"{image.VENV}/bin/python -m pip install --quiet google-api-python-client"],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            f"{ray_bin} stop",
            f"ulimit -n 65536; {ray_bin} start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            f"{ray_bin} stop",
            f"ulimit -n 65536; {ray_bin} start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
    if spec.docker_image:
        config["docker"] = {
            "image": spec.docker_image,
            "container_name": "sr-cloud",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
            "worker_run_options": ["--gpus all"],
        }
    return config


def node_types(spec: ClusterSpec, login: list[str]) -> dict:
    """The CPU head and the autoscaling GPU workers (``available_node_types``)."""
    scheduling = {"onHostMaintenance": "TERMINATE", "automaticRestart": False}
    if spec.spot:
        scheduling = {**scheduling, "provisioningModel": "SPOT", "instanceTerminationAction": "DELETE"}
    return {
        "head": {
            "resources": {"CPU": 8},
            "node_config": {
                "machineType": spec.head_machine_type,
                "disks": _disk(spec),
            },
        },
        "gpu_worker": {
            "min_workers": spec.min_workers,
            "max_workers": spec.max_workers,
            "resources": {"CPU": spec.cpus_per_gpu * spec.gpus_per_worker, "GPU": spec.gpus_per_worker},
            "node_config": {
                "machineType": worker_machine_type(spec),
                "guestAccelerators": [{"acceleratorType": spec.gpu, "acceleratorCount": spec.gpus_per_worker}],
                "metadata": {"items": [{"key": "install-nvidia-driver", "value": "True"}]},
                "scheduling": scheduling,
                "disks": _disk(spec),
                # Ray sets a service account on the head only; without one the
                # workers could not read the inputs or write the outputs.
                "serviceAccounts": [{
                    "email": spec.worker_service_account or service_account_email(spec.project_id),
                    "scopes": SCOPES,
                }],
            },
            # Replaces the global list on these nodes (run before Docker starts).
            "initialization_commands": [WAIT_FOR_DRIVER, *login],
        },
    }


def registry_login_commands(docker_image: str) -> list[str]:
    """What a node runs before Ray's ``docker pull`` of ``docker_image``: for Artifact
    Registry, docker's credential helper for that host (gcloud is on Google's VM images;
    it then uses the VM's service account)."""
    if not docker_image:
        return []
    host, _, _ = image.split_image(docker_image)
    if not image.is_artifact_registry(host):
        return []
    return [f"gcloud auth configure-docker {shell.word(host)} --quiet"]


def cluster_ray_version(config: dict) -> str | None:
    """The Ray version the cluster's setup installs (``ray[default]==X``), if it says."""
    for command in config.get("setup_commands", []):
        m = re.search(r"ray\[default\]==([0-9][0-9A-Za-z.+-]*)", str(command))
        if m:
            return m.group(1)
    return None


@dataclass
class BatchJob:
    """One ``sr cloud batch`` submission."""

    input: str
    output: str
    model: str
    cluster_yaml: str
    submission_id: str
    batch_args: tuple[str, ...] = ()
    project_dir: str = "."
    max_gpus: int = 0
    """GPUs of the cluster at full size (0: none, CPU actors)."""
    cpus_per_gpu: int = 0
    """vCPUs beside each GPU on the GPU workers (0: unknown)."""
    generator: str = "rrdbnet"
    """The model's architecture (registry name), for the CPUs each GPU actor gets."""
    output_format: str = "png"
    """``png``, ``jpeg`` or ``webp`` (from ``sr batch --format``), for the same."""


def runtime_env(job: BatchJob) -> dict:
    """The job's runtime environment: this checkout's code (so the job runs what was
    tested here, not what the cluster was set up with) and unbuffered logs."""
    return {
        "working_dir": job.project_dir,
        "excludes": [".git", ".venv", ".cache", "demo-out", "sr-cloud-out", "*.egg-info", "__pycache__"],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def max_gpus(config: dict) -> int:
    """GPUs of a launcher config's cluster at full size (every node type at max_workers)."""
    total = 0
    for name, node in config.get("available_node_types", {}).items():
        count = 1 if name == config.get("head_node_type") else node.get("max_workers", 0)
        total += count * int(node.get("resources", {}).get("GPU", 0))
    return total


def cpus_per_gpu(config: dict) -> int:
    """vCPUs per GPU on the cluster's GPU node types (the smallest ratio; 0 without GPUs)."""
    ratios = [int(node["resources"].get("CPU", 0)) // int(node["resources"]["GPU"])
              for node in config.get("available_node_types", {}).values()
              if int(node.get("resources", {}).get("GPU", 0)) > 0]
    return min(ratios) if ratios else 0


# Cost per output megapixel (docs/BATCH.md, "Cost per output megapixel";
# bench/bench_batch.py): CPU seconds per output Mpx that an actor spends beside its GPU on
# decoding the input, the LR-consistency metrics and encoding the output, on one core, by
# output format (PNG: the default fpng writer).
CPU_SECONDS_PER_OUTPUT_MPX = {"png": 0.080, "jpeg": 0.067, "webp": 0.125}
# One V100's output Mpx/s per generator at x4: the FLOP model's MFLOP per output pixel
# (2.24 RRDBNet esrgan, 0.151 compact realesr_general) at an ASSUMED 31 TFLOP/s (25% of
# the fp16 tensor-core peak; not measured, the project has no GPU).
GPU_OUTPUT_MPX_PER_S = {"rrdbnet": 14.0, "multihead_rrdbnet": 14.0, "srresnet": 40.0, "srvgg_compact": 207.0}
# Measured CPU costs move with the load of a shared VM (the slow end is ~2x the best).
CPU_HEADROOM = 1.5


def encode_cores_per_gpu(generator: str, output_format: str) -> float:
    """CPU cores one GPU actor needs to keep up with its GPU (decode + metrics + encode)."""
    if generator not in GPU_OUTPUT_MPX_PER_S:
        raise ValueError(f"unknown generator {generator!r}; one of {', '.join(GPU_OUTPUT_MPX_PER_S)}")
    if output_format not in CPU_SECONDS_PER_OUTPUT_MPX:
        raise ValueError(f"unknown output format {output_format!r}; one of {', '.join(CPU_SECONDS_PER_OUTPUT_MPX)}")
    return GPU_OUTPUT_MPX_PER_S[generator] * CPU_SECONDS_PER_OUTPUT_MPX[output_format] * CPU_HEADROOM


def actor_cpus(cpus_per_gpu: int, generator: str = "rrdbnet", output_format: str = "png") -> int:
    """CPUs each GPU actor reserves for its encode threads: what the cost table says its
    GPU needs with this generator and output format, at most the ``cpus_per_gpu`` beside
    the GPU less one for the read + decode tasks and Ray (RRDBNet, PNG: 2 of 8; the compact
    generator, PNG: all 7 of 8, and still short of the ~25 it would need)."""
    if cpus_per_gpu <= 1:
        return 1
    return max(1, min(math.ceil(encode_cores_per_gpu(generator, output_format)), cpus_per_gpu - 1))


def batch_entrypoint(job: BatchJob) -> list[str]:
    """``sr batch`` as the job runs it: results under OUTPUT/_sr_batch/<submission id>/, and
    (on a GPU cluster) one actor per GPU, the pool growing with the autoscaler from one to
    every GPU the cluster can have; options in ``batch_args`` come last and win."""
    command = ["sr", "batch", job.input, job.output, "--model", job.model, "--address", "auto",
               "--run-id", job.submission_id]
    if job.max_gpus:
        command += ["--num-gpus-per-actor", "1", "--actors", f"1,{job.max_gpus}"]
    if job.max_gpus and job.cpus_per_gpu:
        # The encoding beside each GPU gets the CPUs the cost table says it needs, of the
        # worker's (one thread per CPU).
        cpus = actor_cpus(job.cpus_per_gpu, job.generator, job.output_format)
        command += ["--cpus-per-actor", str(cpus), "--encode-threads", str(cpus)]
    return command + list(job.batch_args)


def submit_commands(job: BatchJob, port: int | str) -> list[list[str]]:
    """The commands ``sr cloud batch`` runs, in order: ``ray get-head-ip`` (only tried:
    when the head answers, ``ray up`` is skipped), ``ray up``, ``ray dashboard`` (an SSH
    port-forward of the head's job server to local ``port``, kept up while the next
    commands run), ``ray job submit`` through it and ``ray job logs``."""
    address = f"http://127.0.0.1:{port}"
    return [
        ["ray", "get-head-ip", job.cluster_yaml],
        ["ray", "up", "-y", "--no-restart", job.cluster_yaml],
        ["ray", "dashboard", "--port", str(port), "--remote-port", str(DASHBOARD_PORT), job.cluster_yaml],
        ["ray", "job", "submit", "--address", address, "--submission-id", job.submission_id, "--no-wait",
         "--runtime-env-json", json.dumps(runtime_env(job), sort_keys=True), "--", *batch_entrypoint(job)],
        ["ray", "job", "logs", "--address", address, "--follow", job.submission_id],
    ]


def commands_script(job: BatchJob, ray_version: str | None, notes: list[str]) -> str:
    """commands.sh for ``sr cloud batch``: the same steps as a script that runs as written
    (``ray up`` only when ``ray get-head-ip`` fails; the tunnel in the background on a free
    local port, checked to answer as a Ray job server of the cluster's version before
    the job is submitted through it, and closed when the script exits)."""
    get_ip, up, dashboard, submit, logs = submit_commands(job, shell.PORT)
    line = shell.line
    want = shell.word(ray_version or "")
    return "\n".join([
        "#!/usr/bin/env bash",
        "# Written by sr cloud batch: the commands it runs (or would run with --dry-run).",
        *[shell.comment(n) for n in notes],
        "set -euo pipefail",
        "",
        f"if ! {line(get_ip)} > /dev/null 2>&1; then",
        f"  {line(up)}",
        "fi",
        "",
        "# The head's job server through an SSH tunnel on a free local port (never 8265, where a",
        "# local Ray may listen), closed when this script exits.",
        "port=$(python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); "
        "print(s.getsockname()[1])')",
        f"{line(dashboard)} > /dev/null 2>&1 &",
        "tunnel=$!",
        "trap 'kill \"$tunnel\" 2> /dev/null || true; wait \"$tunnel\" 2> /dev/null || true' EXIT",
        "# Submit only once the tunnel answers as Ray's job server, of the cluster's Ray version.",
        "answers() {",
        "  python3 - \"$1\" \"$2\" <<'PY'",
        "import json, sys, urllib.request",
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))",
        "try:",
        "    found = json.load(opener.open(sys.argv[1] + '/api/version', timeout=5)).get('ray_version')",
        "except Exception:",
        "    sys.exit(1)",
        "sys.exit(0 if found and (not sys.argv[2] or found == sys.argv[2]) else 1)",
        "PY",
        "}",
        "for _ in $(seq 120); do",
        f'  if answers "http://127.0.0.1:${{port}}" {want}; then',
        "    break",
        "  fi",
        '  if ! kill -0 "$tunnel" 2> /dev/null; then',
        "    echo 'ray dashboard (the tunnel to the head) exited' >&2",
        "    exit 1",
        "  fi",
        "  sleep 1",
        "done",
        f'answers "http://127.0.0.1:${{port}}" {want} || '
        "{ echo 'the tunnel did not answer as the Ray job server of the cluster' >&2; exit 1; }",
        line(submit),
        line(logs),
    ]) + "\n"
