"""Training on cloud VMs as a SkyPilot managed job.

SkyPilot provisions the VMs, tells every node its rank, the node count and the node
IPs, and relaunches a managed job whose spot VMs were preempted. What this module adds
is the task: ``setup`` installs the project with a PyTorch build that has V100 (sm_70)
kernels, and ``run`` turns SkyPilot's node variables into an ``accelerate launch`` of
``jobs.train`` that resumes from the run's newest checkpoint, so a relaunch continues
where the preempted run stopped. The task is a plain dict (written as YAML) that
``sky.Task.from_yaml_config`` accepts; nothing here talks to a cloud.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field

from infra import image

LOCAL_SSD = "/mnt/local-ssd"
"""Mount point of the VM's local NVMe SSD (375 GB on GCP), where shards are cached."""

REMOTE_CONFIG = "~/sr-job/config.yaml"
"""Where a local CONFIG.yaml is copied on every node (SkyPilot file mount)."""

DEFAULT_PORT = 29500
"""Rendezvous port of the main process (torch.distributed's usual one)."""

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_GPUS = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)(?::([1-9][0-9]*))?$")


@dataclass
class TrainJob:
    """One ``sr cloud train`` submission."""

    name: str
    """Run name: the SkyPilot job name and the folder under ``BUCKET/runs/``."""

    bucket: str
    """``gs://BUCKET`` (optionally with a prefix) holding ``runs/``."""

    config: str = ""
    """The training CONFIG.yaml as given to ``sr train`` (local path or URL); may be empty."""

    preset: str = ""
    """``--preset`` of ``sr train``; empty means none given."""

    overrides: list[str] = field(default_factory=list)
    """``section.field=value`` overrides, passed to ``sr train`` unchanged."""

    nodes: int = 1
    """VMs (SkyPilot ``num_nodes``)."""

    gpus: str = "V100:1"
    """Accelerators per VM, SkyPilot's ``TYPE:COUNT``."""

    spot: bool = False
    """Spot VMs (preemptible; the managed job relaunches and resumes)."""

    region: str = ""
    """GCP region, e.g. ``us-central1``; empty lets SkyPilot choose the cheapest."""

    zone: str = ""
    """GCP zone, e.g. ``us-central1-a``; implies its region."""

    disk_size: int = 100
    """Boot disk in GB (the environment and the local TensorBoard/checkpoint staging)."""

    local_ssd: bool = True
    """Attach a local NVMe SSD and cache the shards there; else they go on the boot disk."""

    image_id: str = ""
    """SkyPilot ``image_id`` (e.g. ``docker:REGISTRY/sr-cloud:0.1.0``); empty: SkyPilot's GPU image."""

    launch_config: str = ""
    """``accelerate launch --config_file`` (e.g. ``jobs/launch/deepspeed.yaml``), relative to the project."""

    workdir: str = "."
    """The project checkout SkyPilot copies to every node (its ``workdir``)."""

    @property
    def run_dir(self) -> str:
        return f"{self.bucket.rstrip('/')}/runs/{self.name}"

    @property
    def accelerator(self) -> tuple[str, int]:
        m = _GPUS.match(self.gpus)
        assert m, self.gpus
        return m.group(1), int(m.group(2) or 1)


def check_job(job: TrainJob) -> None:
    """Refuse what SkyPilot or the training job would refuse later, naming the option."""
    if not _NAME.match(job.name):
        raise ValueError(f"--name {job.name!r}: use 1-63 lowercase letters, digits and dashes, starting with a letter")
    if not job.bucket.startswith("gs://") or len(job.bucket.rstrip("/")) <= len("gs://"):
        raise ValueError(f"--bucket {job.bucket!r}: give a Google Cloud Storage URL, e.g. gs://my-bucket")
    if job.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {job.nodes}")
    if not _GPUS.match(job.gpus):
        raise ValueError(f"--gpus {job.gpus!r}: use TYPE:COUNT, e.g. V100:4")
    if job.disk_size < 50:
        raise ValueError(f"--disk-size {job.disk_size}: at least 50 GB (the CUDA environment alone takes ~15)")
    if job.zone and job.region and not job.zone.startswith(job.region + "-"):
        raise ValueError(f"--zone {job.zone} is not in --region {job.region}")
    if job.launch_config and not os.path.isfile(os.path.join(job.workdir, job.launch_config)):
        raise ValueError(f"--launch-config {job.launch_config}: no such file in {job.workdir} "
                         "(give a path inside the project, e.g. jobs/launch/<file>.yaml)")
    for item in job.overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        if key == "train.run_dir":
            raise ValueError(f"{item!r}: the run directory is BUCKET/runs/NAME, set by --bucket and --name")


def _sets(job: TrainJob, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in job.overrides)


def train_words(job: TrainJob) -> list[str]:
    """What follows ``-m jobs.train`` up to the shard cache, as shell words: ``--preset``
    first, then the config file and the overrides, kept together (the job's argument
    parser reads its positional arguments as one run). A local config file is read from
    its file mount (``$HOME`` as the shell expands it: the job does not expand ``~``)."""
    words = []
    if job.preset:
        words += ["--preset", shlex.quote(job.preset)]
    if job.config:
        remote = "://" in job.config
        words.append(shlex.quote(job.config) if remote else '"$HOME/' + REMOTE_CONFIG.removeprefix("~/") + '"')
    words += [shlex.quote(o) for o in job.overrides]
    return words


def cache_override(job: TrainJob) -> str | None:
    """``data.cache_dir`` on the local SSD (as a shell word), unless the user chose one."""
    if not job.local_ssd or _sets(job, "data.cache_dir"):
        return None
    return '"data.cache_dir=$SR_LOCAL_DISK/sr-shards"'


def run_script(job: TrainJob) -> str:
    """The task's ``run``: the same script on every node; SkyPilot sets the SKYPILOT_*
    variables. SR_VENV, SR_LOCAL_DISK and SR_MAIN_PROCESS_PORT may be overridden (a
    rehearsal on one host does)."""
    if job.launch_config:
        # The launch config decides the kind of launch (DDP, DeepSpeed) and its precision;
        # the node's place in the cluster comes from SkyPilot.
        lines = [f'"$SR_VENV/bin/accelerate" launch --config_file {shlex.quote(job.launch_config)}']
    else:
        # The job chooses its precision from train.precision and the GPU it finds.
        lines = ['"$SR_VENV/bin/accelerate" launch "${multi_gpu[@]}" --mixed_precision no --dynamo_backend no']
    lines += [
        '--num_machines "$num_nodes" --machine_rank "$node_rank" --num_processes "$num_processes"',
        '--main_process_ip "$main_ip" --main_process_port "$SR_MAIN_PROCESS_PORT"',
        " ".join(["-m jobs.train", *train_words(job)]),
    ]
    cache = cache_override(job)
    if cache:
        lines.append(cache)
    lines.append(shlex.quote(f"train.run_dir={job.run_dir}") + " --resume auto")
    cache_setup = ""
    if cache:
        cache_setup = """
# The local SSD is mounted by root: give this user the shard cache folder on it.
# jobs.train reads each shard from the bucket once per node and then from this disk.
if ! mkdir -p "$SR_LOCAL_DISK/sr-shards" 2>/dev/null || [ ! -w "$SR_LOCAL_DISK/sr-shards" ]; then
  sudo mkdir -p "$SR_LOCAL_DISK/sr-shards"
  sudo chown "$(id -u):$(id -g)" "$SR_LOCAL_DISK/sr-shards"
fi
"""
    command = " \\\n  ".join(lines)
    multi_gpu = "" if job.launch_config else """multi_gpu=()
if [ "$num_processes" -gt 1 ]; then
  multi_gpu=(--multi_gpu)
fi
"""
    return f"""\
#!/usr/bin/env bash
# sr cloud train, run {job.name}: SkyPilot runs this on every node of the task.
set -euo pipefail
SR_VENV="${{SR_VENV:-{image.VENV}}}"
SR_LOCAL_DISK="${{SR_LOCAL_DISK:-{LOCAL_SSD}}}"
SR_MAIN_PROCESS_PORT="${{SR_MAIN_PROCESS_PORT:-{DEFAULT_PORT}}}"

num_nodes="${{SKYPILOT_NUM_NODES:?set by SkyPilot on every node}}"
node_rank="${{SKYPILOT_NODE_RANK:?set by SkyPilot on every node}}"
gpus_per_node="${{SKYPILOT_NUM_GPUS_PER_NODE:?set by SkyPilot on every node}}"
# SKYPILOT_NODE_IPS lists one IP per line, rank 0 first: rank 0 hosts the rendezvous.
main_ip="$(printf '%s\\n' "${{SKYPILOT_NODE_IPS:?set by SkyPilot on every node}}" | head -n 1)"
num_processes=$((num_nodes * gpus_per_node))
{multi_gpu}{cache_setup}
# --resume auto: a relaunched job (after a spot preemption) continues from the newest
# checkpoint in the run directory; a first launch starts from step 0.
exec {command}
"""


def setup_script() -> str:
    """The task's ``setup`` (SkyPilot runs it on every node, in the workdir)."""
    return (f"# sr cloud train: the project with torch {image.TORCH_VERSION}+{image.TORCH_CUDA} "
            "(V100 kernels) in $SR_VENV.\n" + image.install_script("train"))


def build_task(job: TrainJob) -> dict:
    """The SkyPilot task as a dict (``sky.Task.from_yaml_config`` validates it)."""
    check_job(job)
    kind, count = job.accelerator
    infra = "gcp"
    if job.zone:
        infra = f"gcp/{job.zone.rsplit('-', 1)[0]}/{job.zone}"
    elif job.region:
        infra = f"gcp/{job.region}"
    resources: dict = {
        "infra": infra,
        "accelerators": f"{kind}:{count}",
        "use_spot": job.spot,
        "disk_size": job.disk_size,
    }
    if job.local_ssd:
        # One 375 GB local NVMe SSD, formatted and mounted by SkyPilot; it is lost with
        # the VM, which is fine for a cache.
        resources["volumes"] = [{"path": LOCAL_SSD, "storage_type": "instance"}]
    if job.image_id:
        resources["image_id"] = job.image_id
    task = {
        "name": job.name,
        "workdir": job.workdir,
        "num_nodes": job.nodes,
        "resources": resources,
        "setup": setup_script(),
        "run": run_script(job),
    }
    if job.config and "://" not in job.config:
        task["file_mounts"] = {REMOTE_CONFIG: job.config}
    return task


def launch_command(task_path: str, job: TrainJob) -> list[str]:
    # --detach-run: return once the job is submitted; `sr cloud logs` follows it.
    return ["sky", "jobs", "launch", task_path, "--name", job.name, "--yes", "--detach-run"]


def status_command() -> list[str]:
    return ["sky", "jobs", "queue", "--all"]


def logs_command(name: str, follow: bool = True, controller: bool = False) -> list[str]:
    cmd = ["sky", "jobs", "logs", "--name", name, "--follow" if follow else "--no-follow"]
    if controller:
        cmd.append("--controller")
    return cmd


def stop_command(name: str) -> list[str]:
    return ["sky", "jobs", "cancel", "--name", name, "--yes"]
