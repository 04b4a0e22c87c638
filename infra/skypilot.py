"""Training on cloud VMs as a SkyPilot managed job.

SkyPilot provisions the VMs, tells every node its rank, the node count and the node
IPs, and relaunches a managed job whose spot VMs were preempted. What this module adds
is the task: ``setup`` installs the project with a PyTorch build that has V100 (sm_70)
kernels, and ``run`` turns SkyPilot's node variables into an ``accelerate launch`` of
``jobs.train`` that resumes from the run's newest checkpoint, so a relaunch continues
where the preempted run stopped. The managed job is also restarted after an error of
its own (a storage outage past the retry budget, an NCCL timeout, an out-of-memory):
``resources.job_recovery.max_restarts_on_errors``, without which SkyPilot restarts after
preemptions only. A Docker image in Artifact Registry is pulled with the VMs' own service
account (SkyPilot's docker login settings with an empty password make it run
``gcloud auth configure-docker`` on the VM); another private registry's login comes from
the submitting shell's ``SKYPILOT_DOCKER_*`` variables, passed as secrets. The task is a
plain dict (written as YAML) that ``sky.Task.from_yaml_config`` accepts; nothing here
talks to a cloud.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from infra import image, shell

LOCAL_SSD = "/mnt/local-ssd"
"""Mount point of the VM's local NVMe SSD (375 GB on GCP), where shards are cached."""

REMOTE_CONFIG = "~/sr-job/config.yaml"
"""Where a local CONFIG.yaml is copied on every node (SkyPilot file mount)."""

DEFAULT_PORT = 29500
"""Rendezvous port of the main process (torch.distributed's usual one)."""

MAX_RESTARTS_ON_ERRORS = 3
"""Restarts of a managed job that failed by itself (not by preemption), each resuming
from the newest checkpoint (the number SkyPilot's task reference uses in its example)."""

FINISHED_STATES = ("SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
                   "FAILED_CONTROLLER", "CANCELLED")
"""SkyPilot's terminal managed-job states; in any other (PENDING, STARTING, RUNNING,
RECOVERING, WINDING_DOWN, CANCELLING...) the job still owns its run directory."""

N1_SIZES = (1, 2, 4, 8, 16, 32, 64, 96)
"""vCPU counts of GCP's N1 machine types (V100s, T4s and P100s attach only to N1 VMs)."""

HOST_VCPUS = {
    "V100": {1: 8, 2: 16, 4: 32, 8: 64},
    "P100": {1: 8, 2: 16, 4: 32},
    "T4": {1: 4, 2: 8, 4: 48},
}
"""vCPUs SkyPilot asks of the host VM per accelerator count on GCP (its GCP catalog), with
at least 4 GB of memory per vCPU; N1's standard types have 3.75, so it picks n1-highmem."""

CONTROLLER_MACHINE = "n2-standard-4"
"""The jobs controller VM: SkyPilot's default controller resources are 4+ vCPUs with 4 GB
per vCPU (n2-standard-4 on GCP; docs/CLOUD.md pins it and its region in ~/.sky/config.yaml)."""

CONTROLLER_DISK_GB = 50
"""The jobs controller's boot disk (SkyPilot's default)."""

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
    """SkyPilot ``image_id``: a Docker image (``docker:REGISTRY/sr-cloud:0.1.0``, the prefix
    optional when REGISTRY is a host) or a VM image; empty: SkyPilot's GPU VM image."""

    launch_config: str = ""
    """``accelerate launch --config_file`` (e.g. ``jobs/launch/deepspeed_zero2_8_gpus.yaml``), relative to the project."""

    workdir: str = "."
    """The project checkout SkyPilot copies to every node (its ``workdir``)."""

    max_restarts_on_errors: int = MAX_RESTARTS_ON_ERRORS
    """Restarts after the job fails by itself (``resources.job_recovery``)."""

    registry_login_from_env: bool = False
    """A private registry outside Artifact Registry: SkyPilot's docker login settings come
    from the submitting shell's ``SKYPILOT_DOCKER_*`` variables as secrets."""

    @property
    def run_dir(self) -> str:
        return f"{self.bucket.rstrip('/')}/runs/{self.name}"

    @property
    def accelerator(self) -> tuple[str, int]:
        m = _GPUS.match(self.gpus)
        assert m, self.gpus
        return m.group(1), int(m.group(2) or 1)


def host_machine_type(kind: str, count: int) -> str:
    """The GCP VM SkyPilot picks for ``kind:count`` (e.g. n1-highmem-32 for V100:4)."""
    table = HOST_VCPUS.get(kind.upper())
    if table is None or count not in table:
        known = ", ".join(f"{k}:{n}" for k, v in HOST_VCPUS.items() for n in v)
        raise ValueError(f"--gpus {kind}:{count}: the host VM is known for {known}")
    vcpus = next(n for n in N1_SIZES if n >= table[count])
    return f"n1-highmem-{vcpus}"


def machine_vcpus(machine_type: str) -> int:
    """vCPUs of a predefined GCP machine type (``n1-highmem-32`` -> 32)."""
    tail = machine_type.rsplit("-", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"{machine_type}: not a predefined machine type (FAMILY-KIND-VCPUS)")
    return int(tail)


def _launch_kind(config: dict) -> str:
    kind = config.get("distributed_type", "NO")
    # YAML 1.1 reads an unquoted NO as false.
    return "NO" if kind is False or kind is None else str(kind).upper()


def check_launch_config(job: TrainJob) -> None:
    """Refuse an Accelerate launch config that cannot use the GPUs the task asks for:
    SkyPilot's node count, rank and process count override the file's, but its kind of
    launch and its GPU ids stay, and a single-process file would train on one GPU of many."""
    import yaml

    path = os.path.join(job.workdir, job.launch_config)
    with open(path) as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError:
            config = None
    if not isinstance(config, dict):
        raise ValueError(f"--launch-config {job.launch_config}: not an Accelerate config (a YAML mapping)")
    _, per_node = job.accelerator
    total = job.nodes * per_node
    kind = _launch_kind(config)
    shape = f"{job.nodes} x {job.gpus} = {total} GPU{'s' if total > 1 else ''}"
    if config.get("use_cpu") is True:
        raise ValueError(f"--launch-config {job.launch_config} sets use_cpu: true; the task has {shape}")
    if kind == "NO" and total > 1:
        raise ValueError(f"--launch-config {job.launch_config} runs one process (distributed_type NO) but the task "
                         f"has {shape}: use a multi-GPU config (e.g. jobs/launch/one_vm_8_gpus.yaml) or none")
    if kind == "MULTI_GPU" and total < 2:
        raise ValueError(f"--launch-config {job.launch_config} is a multi-GPU launch but the task has {shape}: "
                         "use jobs/launch/one_gpu.yaml or no --launch-config")
    gpu_ids = config.get("gpu_ids")
    if gpu_ids is not None and str(gpu_ids) != "all" and len(str(gpu_ids).split(",")) < per_node:
        raise ValueError(f"--launch-config {job.launch_config} uses gpu_ids {gpu_ids} of the {per_node} GPUs "
                         "per VM: set gpu_ids: all")


def check_job(job: TrainJob) -> None:
    """Refuse what SkyPilot or the training job would refuse later, naming the option."""
    shell.check_name(job.name, "--name")
    shell.check_bucket(job.bucket)
    if job.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {job.nodes}")
    if not _GPUS.match(job.gpus):
        raise ValueError(f"--gpus {job.gpus!r}: use TYPE:COUNT, e.g. V100:4")
    if job.disk_size < 50:
        raise ValueError(f"--disk-size {job.disk_size}: at least 50 GB (the CUDA environment alone takes ~15)")
    for option, value in (("--region", job.region), ("--zone", job.zone)):
        if value and not shell.LOCATION.match(value):
            raise ValueError(f"{option} {shell.shown(value)}: a GCP location, e.g. us-central1 or us-central1-a")
    if job.zone and job.region and not job.zone.startswith(job.region + "-"):
        raise ValueError(f"--zone {job.zone} is not in --region {job.region}")
    if job.launch_config and not os.path.isfile(os.path.join(job.workdir, job.launch_config)):
        raise ValueError(f"--launch-config {job.launch_config}: no such file in {job.workdir} "
                         "(give a path inside the project, e.g. jobs/launch/<file>.yaml)")
    if job.launch_config:
        check_launch_config(job)
    if job.max_restarts_on_errors < 0:
        raise ValueError(f"--max-restarts-on-errors must be >= 0, got {job.max_restarts_on_errors}")
    if job.image_id.startswith("docker:") or image.docker_image(job.image_id):
        image.split_image(image.docker_image(job.image_id) or job.image_id)
    for item in job.overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ValueError(f"override {shell.shown(item)} must look like section.field=value")
        if key == "train.run_dir":
            raise ValueError(f"{shell.shown(item)}: the run directory is BUCKET/runs/NAME, set by --bucket and --name")


def _sets(job: TrainJob, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in job.overrides)


def train_words(job: TrainJob) -> list[str]:
    """What follows ``-m jobs.train`` up to the shard cache, as shell words: ``--preset``
    first, then the config file and the overrides, kept together (the job's argument
    parser reads its positional arguments as one run). A local config file is read from
    its file mount (``$HOME`` as the shell expands it: the job does not expand ``~``)."""
    words = []
    if job.preset:
        words += ["--preset", shell.word(job.preset)]
    if job.config:
        remote = "://" in job.config
        words.append(shell.word(job.config) if remote else '"$HOME/' + REMOTE_CONFIG.removeprefix("~/") + '"')
    words += [shell.word(o) for o in job.overrides]
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
        lines = [f'"$SR_VENV/bin/accelerate" launch --config_file {shell.word(job.launch_config)}']
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
    lines.append(shell.word(f"train.run_dir={job.run_dir}") + " --resume auto")
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
    header = shell.comment(f"sr cloud train, run {job.name}: SkyPilot runs this on every node of the task.")
    return f"""\
#!/usr/bin/env bash
{header}
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
    # A failure of the job itself (exit code != 0) is retried too: --resume auto makes a
    # restart continue from the newest checkpoint. Exit codes cannot single out storage
    # outages here: `accelerate launch` exits 1 whatever its processes exited with.
    resources["job_recovery"] = {"max_restarts_on_errors": job.max_restarts_on_errors}
    task = {
        "name": job.name,
        "workdir": job.workdir,
        "num_nodes": job.nodes,
        "resources": resources,
    }
    docker = image.docker_image(job.image_id)
    if docker:
        resources["image_id"] = f"docker:{docker}"
        task.update(registry_login(job))
    elif job.image_id:
        resources["image_id"] = job.image_id  # a VM image
    task["setup"] = setup_script()
    task["run"] = run_script(job)
    if job.config and "://" not in job.config:
        task["file_mounts"] = {REMOTE_CONFIG: job.config}
    return task


def registry_login(job: TrainJob) -> dict:
    """The task's docker login settings for ``job.image_id`` (``envs`` or ``secrets``), or
    none for a public image. Artifact Registry: the server and an empty user and password,
    so SkyPilot configures docker on the VM for that host and the VM's service account
    (skypilot-v1, with roles/artifactregistry.reader) pulls. Another registry: all three
    as secrets, the user and password filled from the submitting shell by ``--secret``,
    so the password never lands in a file."""
    docker = image.docker_image(job.image_id)
    if not docker:
        return {}
    host, _, _ = image.split_image(docker)
    if image.is_artifact_registry(host):
        return {"envs": {"SKYPILOT_DOCKER_USERNAME": "", "SKYPILOT_DOCKER_PASSWORD": "",
                         "SKYPILOT_DOCKER_SERVER": host}}
    if job.registry_login_from_env:
        return {"secrets": {"SKYPILOT_DOCKER_USERNAME": None, "SKYPILOT_DOCKER_PASSWORD": None,
                            "SKYPILOT_DOCKER_SERVER": host or "docker.io"}}
    return {}


def launch_command(task_path: str, job: TrainJob) -> list[str]:
    # --detach-run: return once the job is submitted; `sr cloud logs` follows it.
    command = ["sky", "jobs", "launch", task_path, "--name", job.name, "--yes", "--detach-run"]
    if job.image_id and job.registry_login_from_env and "secrets" in registry_login(job):
        # Without a value, --secret takes the variable from the environment of `sky`.
        command += ["--secret", "SKYPILOT_DOCKER_USERNAME", "--secret", "SKYPILOT_DOCKER_PASSWORD"]
    return command


def active_jobs_command() -> list[str]:
    return ["sky", "jobs", "queue", "--skip-finished", "--output", "json"]


def active_jobs(queue_json: str, name: str) -> list[tuple[int | None, str]]:
    """``(job id, state)`` of the managed jobs named ``name`` that have not finished, read
    from ``sky jobs queue --skip-finished --output json`` (a list of job records)."""
    try:
        records = json.loads(queue_json)
    except json.JSONDecodeError:
        raise ValueError("`sky jobs queue --output json` did not print JSON: "
                         f"{' '.join(queue_json.split())[:200]!r}") from None
    found = []
    for record in records:
        state = str(record.get("status") or "")
        if record.get("job_name") == name and state not in FINISHED_STATES:
            found.append((record.get("job_id"), state))
    return found


def status_command() -> list[str]:
    return ["sky", "jobs", "queue", "--all"]


def logs_command(name: str, follow: bool = True, controller: bool = False) -> list[str]:
    cmd = ["sky", "jobs", "logs", "--name", name, "--follow" if follow else "--no-follow"]
    if controller:
        cmd.append("--controller")
    return cmd


def stop_command(name: str) -> list[str]:
    return ["sky", "jobs", "cancel", "--name", name, "--yes"]


# --- sr cloud gpu-check ---------------------------------------------------------------

GPU_CHECK_CLUSTER = "sr-gpu-check"


def gpu_check_task(gpus: str, spot: bool, region: str, table: str, workdir: str) -> dict:
    """A SkyPilot task that installs the project on one GPU VM (torch with V100 kernels,
    as ``sr cloud train`` installs it) and runs ``./dev gpu-check`` there, writing its
    table to ``table`` (a gs:// URL keeps it after the VM is gone; it is in the log too)."""
    if not _GPUS.match(gpus):
        raise ValueError(f"--gpus {gpus!r}: use TYPE:COUNT, e.g. V100:1")
    if region and not shell.LOCATION.match(region):
        raise ValueError(f"--region {shell.shown(region)}: a GCP region, e.g. us-central1")
    run = f"""\
set -uo pipefail
SR_VENV="${{SR_VENV:-{image.VENV}}}"
export TORCH_EXTENSIONS_DIR="$HOME/.cache/torch_extensions"
nvidia-smi
"$SR_VENV/bin/python" -m infra.gpucheck --out {shell.word(table)}
"""
    return {
        "name": GPU_CHECK_CLUSTER,
        "workdir": workdir,
        "resources": {"infra": f"gcp/{region}" if region else "gcp", "accelerators": gpus, "use_spot": spot,
                      "disk_size": 100},
        "setup": "# the project with the cloud torch build (V100 kernels), as `sr cloud train` installs it\n"
                 + image.install_script("train,batch"),
        "run": run,
    }


def gpu_check_launch_command(task_path: str) -> list[str]:
    # A plain cluster, not a managed job: the check is minutes long and is not resumed;
    # --down deletes the VM when it ends.
    return ["sky", "launch", "-c", GPU_CHECK_CLUSTER, task_path, "--down", "--yes"]
