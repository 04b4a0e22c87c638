"""infra's subcommands: ``sr cloud ...`` (training on SkyPilot, batch on a Ray cluster,
``doctor`` to check a project first) and ``sr tensorboard``. Handlers import what they need, so ``sr --help`` stays instant.

Every ``sr cloud`` command that would call a cloud tool writes what it generated and
the exact commands into an output folder and prints them; with ``--dry-run`` it stops
there, without it checks for the tool and Google Cloud credentials (local files only)
before running anything, so a machine without them fails in a second with one line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from infra import shell

from jobs.config import split_config_args

DEFAULT_OUT = "sr-cloud-out"


def _add_out_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="write the generated files and print the commands; contact no cloud")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"folder for the generated files and commands.sh (default: {DEFAULT_OUT}/<name>/)")


def add_cloud_parser(sub: argparse._SubParsersAction) -> None:
    cloud = sub.add_parser(
        "cloud",
        help="submit training to GPU VMs (SkyPilot) and batch upscaling to a Ray cluster on Google Cloud",
        description="Google Cloud submission. Training runs as a SkyPilot managed job (relaunched after a "
                    "spot preemption or an error of its own, resuming from the run's newest checkpoint); batch "
                    "upscaling runs on a cluster made by Ray's cluster launcher. `sr cloud doctor` checks a "
                    "project first. See docs/CLOUD.md.",
    )
    cloud_sub = cloud.add_subparsers(dest="cloud_command", metavar="ACTION")
    cloud_sub.required = True

    p = cloud_sub.add_parser(
        "train",
        help="submit `sr train` to V100 VMs as a SkyPilot managed job",
        description="Write a SkyPilot task that installs the project (torch with V100 kernels) on every "
                    "VM and runs `accelerate launch -m jobs.train ARGS --resume auto "
                    "train.run_dir=BUCKET/runs/NAME` across the nodes, then submit it with "
                    "`sky jobs launch`. Config arguments are those of `sr train`.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.field=value ...]",
                   help="the training config file (optional, local or gs://) and dotted overrides, as for `sr train` "
                        "(before or after the options, the overrides together)")
    p.add_argument("--preset", default="", help="config preset, as for `sr train` (default: none)")
    p.add_argument("--name", required=True, help="run name: the managed job's name and BUCKET/runs/NAME")
    p.add_argument("--bucket", required=True, help="gs://BUCKET[/prefix] that holds runs/")
    p.add_argument("--nodes", type=int, default=1, help="number of VMs (default: 1)")
    p.add_argument("--gpus", default="V100:1", help="accelerators per VM as TYPE:COUNT (default: V100:1)")
    p.add_argument("--spot", action="store_true", help="use spot VMs (relaunched and resumed after preemption)")
    p.add_argument("--region", default="", help="GCP region (default: SkyPilot picks the cheapest with capacity)")
    p.add_argument("--zone", default="", help="GCP zone (default: any in the region)")
    p.add_argument("--disk-size", type=int, default=100, help="boot disk per VM in GB (default: 100)")
    p.add_argument("--no-local-ssd", dest="local_ssd", action="store_false",
                   help="cache shards on the boot disk instead of a 375 GB local NVMe SSD")
    p.add_argument("--image", default="",
                   help="run in this Docker image, e.g. docker:us-central1-docker.pkg.dev/P/sr/sr-cloud:0.1.0 "
                        "(default: SkyPilot's GPU VM image). Artifact Registry images are pulled with the VMs' "
                        "service account; for another private registry export SKYPILOT_DOCKER_USERNAME and "
                        "SKYPILOT_DOCKER_PASSWORD first")
    p.add_argument("--launch-config", default="",
                   help="accelerate config file in the project, e.g. jobs/launch/deepspeed_zero2_8_gpus.yaml "
                        "(default: none); refused when it cannot use the GPUs asked for")
    p.add_argument("--max-restarts-on-errors", type=int, default=None, metavar="N",
                   help="restart the job up to N times after it fails by itself (storage outage, NCCL timeout, "
                        "out of memory), resuming from its newest checkpoint (default: 3); preemptions always "
                        "relaunch")
    _add_out_options(p)
    p.set_defaults(func=run_train)

    for action, text in (("status", "show the managed job's state (SkyPilot's job queue)"),
                         ("logs", "follow the managed job's output"),
                         ("stop", "cancel the managed job (its checkpoints stay in the bucket)")):
        p = cloud_sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("name", metavar="RUN", help="the run name given to `sr cloud train --name`")
        if action == "logs":
            p.add_argument("--no-follow", dest="follow", action="store_false", help="print the log so far and exit")
            p.add_argument("--controller", action="store_true",
                           help="the controller's log: provisioning, preemptions and recoveries")
        _add_out_options(p)
        p.set_defaults(func=run_job_command, action=action)

    p = cloud_sub.add_parser(
        "gpu-check",
        help="run ./dev gpu-check (every CUDA path, a Markdown table) on one GPU VM, deleted when it ends",
        description="Write a SkyPilot task that installs the project on one GPU VM (torch with V100 kernels, "
                    "as `sr cloud train` does) and runs the GPU check there, then start it with `sky launch "
                    "--down` (the VM is deleted when the check ends). The table is printed in the log and "
                    "written to --table.",
    )
    p.add_argument("--gpus", default="V100:1", help="accelerators of the VM as TYPE:COUNT (default: V100:1)")
    p.add_argument("--spot", action="store_true", help="a spot VM")
    p.add_argument("--region", default="", help="GCP region (default: SkyPilot picks the cheapest with capacity)")
    p.add_argument("--table", default="gpu-check.md",
                   help="where the check writes its table on the VM; a gs:// URL keeps it after the VM is deleted "
                        "(default: gpu-check.md on the VM, in the log only)")
    _add_out_options(p)
    p.set_defaults(func=run_gpu_check)

    p = cloud_sub.add_parser(
        "ray-config",
        help="print a Ray cluster-launcher config for GCP GPU workers (use: > cluster.yaml)",
        description="Print a Ray cluster-launcher YAML for Google Cloud: a CPU head node and an autoscaling "
                    "pool of GPU workers whose setup installs the project (torch with V100 kernels). "
                    "It contacts nothing; `sr cloud batch --cluster` uses the file.",
    )
    p.add_argument("--project", default="",
                   help="GCP project id (default: gcloud's, from `gcloud config set project`)")
    p.add_argument("--name", default="sr-batch", help="cluster name (default: sr-batch)")
    p.add_argument("--region", default="us-central1", help="GCP region (default: us-central1)")
    p.add_argument("--zone", default="us-central1-a", help="GCP zone with the GPUs (default: us-central1-a)")
    p.add_argument("--gpu", default="nvidia-tesla-v100", help="GCP accelerator type (default: nvidia-tesla-v100)")
    p.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs per worker VM: 1, 2, 4 or 8 (default: 1)")
    p.add_argument("--cpus-per-gpu", type=int, default=8, help="vCPUs per GPU on workers (default: 8)")
    p.add_argument("--min-workers", type=int, default=0, help="workers kept while idle (default: 0)")
    p.add_argument("--max-workers", type=int, default=4, help="most workers the autoscaler starts (default: 4)")
    p.add_argument("--spot", action="store_true", help="spot GPU workers")
    p.add_argument("--disk-gb", type=int, default=200, help="boot disk per node in GB (default: 200)")
    p.add_argument("--source-image", default=None, help="VM image of the nodes (default: a Deep Learning VM family)")
    p.add_argument("--image", default="",
                   help="run the nodes inside this Docker image (default: none); an Artifact Registry image is "
                        "pulled with the nodes' service account")
    p.add_argument("--service-account", default="", metavar="EMAIL",
                   help="service account of the GPU workers (default: Ray's ray-autoscaler-sa-v1@PROJECT, "
                        "which `ray up` creates with roles/storage.objectAdmin)")
    p.add_argument("-o", "--output", default="-", help="write the YAML here (default: standard output)")
    p.set_defaults(func=run_ray_config)

    p = cloud_sub.add_parser(
        "doctor",
        help="check a Google Cloud project before launching: APIs, quotas, rights, service accounts, bucket, image",
        description="Check, with your application-default credentials and without changing anything, what "
                    "the training shape (--nodes/--gpus/--spot) and the batch cluster (--cluster) need: the "
                    "APIs enabled, the Compute Engine quotas (regional and all-regions) against the VMs SkyPilot "
                    "and Ray would create, the GPUs offered in the zones, your rights to create service accounts "
                    "and grant roles, the VMs' service accounts and their roles, the bucket's region against the "
                    "VMs', and that the image can be pulled. Each failed check prints its fix. Exit codes: 0 all "
                    "passed, 1 some failed, 2 no credentials or bad arguments, 75 Google's APIs unreachable.",
    )
    p.add_argument("--project", default="", help="GCP project id (default: the cluster config's, else gcloud's)")
    p.add_argument("--region", default="", help="region of the training VMs (default: the cluster's, else us-central1)")
    p.add_argument("--zone", default="", help="zone of the training VMs (default: any in the region)")
    p.add_argument("--bucket", default="", help="gs://BUCKET the jobs read and write (default: not checked)")
    p.add_argument("--nodes", type=int, default=1, help="training VMs, as for `sr cloud train` (default: 1)")
    p.add_argument("--gpus", default="V100:1", help="accelerators per training VM (default: V100:1)")
    p.add_argument("--spot", action="store_true", help="spot training VMs")
    p.add_argument("--disk-size", type=int, default=100, help="boot disk per training VM in GB (default: 100)")
    p.add_argument("--no-local-ssd", dest="local_ssd", action="store_false", help="training VMs without local SSD")
    p.add_argument("--no-train", dest="train", action="store_false", help="check the batch cluster only")
    p.add_argument("--cluster", default="", metavar="CLUSTER.yaml",
                   help="a Ray cluster config from `sr cloud ray-config` (default: no batch cluster)")
    p.add_argument("--image", default="", help="the training image (--image of `sr cloud train`); the cluster's "
                                               "image is read from CLUSTER.yaml")
    p.add_argument("--dry-run", action="store_true", help="print what would be checked; contact nothing")
    p.set_defaults(func=run_doctor)

    p = cloud_sub.add_parser(
        "batch",
        help="run `sr batch` on a Ray cluster (ray up when needed, then ray job submit)",
        description="Start the cluster described by CLUSTER (Ray's cluster launcher) unless it is up, "
                    "forward its job server to 127.0.0.1, and submit `sr batch INPUT OUTPUT --model M "
                    "--address auto [--batch-args]` with this checkout as the job's working dir.",
    )
    p.add_argument("input", metavar="INPUT", help="bucket prefix of the images, e.g. gs://in/photos")
    p.add_argument("output", metavar="OUTPUT", help="bucket prefix for the results, e.g. gs://out/photos")
    p.add_argument("--model", required=True, help="model file the cluster can read, e.g. gs://models/x4.safetensors")
    p.add_argument("--cluster", required=True, metavar="CLUSTER.yaml", help="from `sr cloud ray-config`")
    p.add_argument("--batch-args", default="", metavar="'OPTIONS'",
                   help="more options of `sr batch` as one string after '=', e.g. --batch-args='--overwrite --limit 1000' "
                        "(default: none)")
    p.add_argument("--submission-id", default="", help="Ray job submission id (default: sr-batch-<UTC time>)")
    p.add_argument("--generator", default="rrdbnet",
                   choices=["rrdbnet", "multihead_rrdbnet", "srresnet", "srvgg_compact"],
                   help="the model's architecture: sizes the CPUs of each GPU actor from the cost per output "
                        "megapixel (docs/BATCH.md; default: rrdbnet)")
    _add_out_options(p)
    p.set_defaults(func=run_batch)


def add_tensorboard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tensorboard",
        help="TensorBoard on a run directory, a runs prefix or a batch output prefix (gs:// included)",
        description="Serve TensorBoard on a training run directory (gs://B/runs/NAME), a runs prefix "
                    "(gs://B/runs: every run side by side) or a batch OUTPUT prefix (its _sr_batch/ "
                    "folder), and print the URL. Ctrl-C stops it.",
    )
    p.add_argument("target", metavar="RUN_OR_PREFIX", help="run directory or prefix (local or any fsspec URL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=6006, help="port (default: 6006; 0 picks a free one)")
    p.add_argument("--reload-interval", type=float, default=30.0,
                   help="seconds between rescans of the event files (default: 30)")
    p.set_defaults(func=run_tensorboard)


# --- helpers ------------------------------------------------------------------------


def project_dir() -> str:
    """The checkout that SkyPilot and Ray copy to the VMs (this installed package's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")) or not os.path.isdir(os.path.join(root, "jobs")):
        raise ValueError(f"{root} is not an sr-cloud checkout: `sr cloud` ships the checkout it is installed "
                         "from to the VMs, so install with `pip install -e .` from a clone")
    return root


def dump_yaml(data) -> str:
    """YAML with multi-line strings (the scripts) as readable literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def str_presenter(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, str_presenter)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=120)


def _out_dir(args: argparse.Namespace, name: str) -> str:
    """``--out``, else ``sr-cloud-out/NAME``, as an absolute path; NAME has been checked to be one folder name,
    and a path that would still leave sr-cloud-out/ is refused (nothing is written)."""
    if args.out:
        out = args.out
    else:
        out = os.path.join(DEFAULT_OUT, name)
        inside = os.path.realpath(DEFAULT_OUT) + os.sep
        if not os.path.realpath(out).startswith(inside):
            raise ValueError(f"{shell.shown(name)}: not a folder name inside {DEFAULT_OUT}/")
    os.makedirs(out, exist_ok=True)
    # Absolute: commands.sh names its files by this path and must run from any folder.
    return os.path.abspath(out)


def _write(path: str, text: str, executable: bool = False) -> None:
    with open(path, "w") as f:
        f.write(text)
    if executable:
        os.chmod(path, 0o755)


def _commands_sh(commands: list[str], notes: list[str]) -> str:
    lines = ["#!/usr/bin/env bash", "# Written by sr cloud: the commands it runs (or would run with --dry-run).",
             "set -euo pipefail"]
    lines += [shell.comment(n) for n in notes]
    lines += commands
    return "\n".join(lines) + "\n"


def _print_plan(out: str, commands: list[list[str]], dry_run: bool) -> None:
    print(f"commands: {os.path.join(out, 'commands.sh')}")
    print("dry run: nothing was submitted; these would run:" if dry_run else "running:")
    for c in commands:
        print("  " + shell.line(c))
    sys.stdout.flush()


def _run(tool_path: str, command: list[str], capture: bool = False):
    import subprocess

    return subprocess.run([tool_path, *command[1:]], text=True, capture_output=capture)


# --- sr cloud train / status / logs / stop --------------------------------------------


def check_training_config(job) -> str:
    """Load the config here as the nodes will (preset, file, overrides), so a typo fails
    now rather than after the VMs are paid for. Returns what was checked."""
    from infra import skypilot

    try:
        from jobs.config import load_config
    except ImportError:
        return "config not checked here (the jobs package is not installed)"
    if job.config and "://" in job.config:
        return f"config file {job.config} not read here (remote); overrides checked on the nodes"
    overrides = list(job.overrides)
    if skypilot.cache_override(job):
        overrides.append(f"data.cache_dir={skypilot.LOCAL_SSD}/sr-shards")
    load_config(job.config or None, overrides, preset=job.preset or "default")
    return "config checked"


def run_train(args: argparse.Namespace) -> int:
    from infra import skypilot
    from infra.credentials import require_gcp

    config, overrides = split_config_args(args.items)
    config = config or ""
    if config and "://" not in config:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{config}: no such config file")
        config = os.path.abspath(config)
    from infra import image

    restarts = skypilot.MAX_RESTARTS_ON_ERRORS if args.max_restarts_on_errors is None else args.max_restarts_on_errors
    login_from_env = False
    if image.docker_image(args.image):
        host, _, _ = image.split_image(image.docker_image(args.image))
        login_from_env = not image.is_artifact_registry(host) and "SKYPILOT_DOCKER_PASSWORD" in os.environ
    job = skypilot.TrainJob(
        name=args.name, bucket=args.bucket, config=config, preset=args.preset, overrides=overrides,
        nodes=args.nodes, gpus=args.gpus, spot=args.spot, region=args.region, zone=args.zone,
        disk_size=args.disk_size, local_ssd=args.local_ssd, image_id=args.image,
        launch_config=args.launch_config, workdir=project_dir(), max_restarts_on_errors=restarts,
        registry_login_from_env=login_from_env,
    )
    task = skypilot.build_task(job)
    checked = check_training_config(job)
    out = _out_dir(args, job.name)
    task_path = os.path.join(out, "task.yaml")
    _write(task_path, dump_yaml(task))
    _write(os.path.join(out, "run.sh"), task["run"], executable=True)
    _write(os.path.join(out, "setup.sh"), "#!/usr/bin/env bash\n" + task["setup"], executable=True)
    command = skypilot.launch_command(task_path, job)
    queue = skypilot.active_jobs_command()
    # The JSON is indented: each record's '"job_name": "NAME"' is on a line of its own.
    pattern = '"job_name": "%s"' % job.name
    message = f"a managed job named {job.name} has not finished: sr cloud status {job.name}"
    guard = [f"if {shell.line(queue)} | grep -qF {shell.word(pattern)}; then",
             f"  echo {shell.word(message)} >&2", "  exit 2", "fi"]
    _write(os.path.join(out, "commands.sh"),
           _commands_sh(guard + [shell.line(command)],
                        [f"run directory: {job.run_dir}",
                         "refused while a job of the same name has not finished (it would share the run directory)"]),
           executable=True)
    kind, count = job.accelerator
    host = skypilot.HOST_VCPUS.get(kind.upper(), {}).get(count) and skypilot.host_machine_type(kind, count)
    print(f"SkyPilot task: {task_path} ({job.nodes} x {kind}:{count}{f' on {host}' if host else ''}"
          f"{', spot' if job.spot else ''}; restarts on errors: {job.max_restarts_on_errors}; "
          f"setup.sh and run.sh beside it; {checked})")
    print(f"run directory: {job.run_dir} (checkpoints, TensorBoard events, models)")
    if "secrets" in task:
        print("registry login: SKYPILOT_DOCKER_USERNAME and SKYPILOT_DOCKER_PASSWORD from this shell, as secrets")
    elif "envs" in task:
        print(f"registry login: the VMs' service account pulls from {task['envs']['SKYPILOT_DOCKER_SERVER']} "
              "(it needs roles/artifactregistry.reader: sr cloud doctor --image ... checks)")
    elif image.docker_image(args.image):
        print("registry login: none (a public image; for a private registry export SKYPILOT_DOCKER_USERNAME "
              "and SKYPILOT_DOCKER_PASSWORD first)")
    _print_plan(out, [queue, command], args.dry_run)
    if args.dry_run:
        return 0
    sky = require_gcp("sky")
    refuse_if_running(sky, job.name, job.run_dir)
    done = _run(sky, command)
    if done.returncode != 0:
        raise ValueError(f"`sky jobs launch` failed (exit {done.returncode}); its output is above")
    print(f"submitted {job.name}: sr cloud logs {job.name} | sr cloud status {job.name} | "
          f"sr tensorboard {job.run_dir}")
    return 0


def refuse_if_running(sky: str, name: str, run_dir: str) -> None:
    """ValueError when a managed job called ``name`` has not finished: a second one would
    write checkpoints into the same run directory."""
    from infra import skypilot

    done = _run(sky, skypilot.active_jobs_command(), capture=True)
    if done.returncode != 0:
        raise ValueError(f"`sky jobs queue` failed (exit {done.returncode}): "
                         f"{' '.join(done.stderr.split())[-300:] or 'no output'}")
    active = skypilot.active_jobs(done.stdout, name)
    if active:
        job_id, state = active[0]
        raise ValueError(f"managed job {name} (id {job_id}) is {state}: a second one would share {run_dir}; "
                         f"follow it (sr cloud logs {name}), stop it (sr cloud stop {name}) or use another --name")


def run_job_command(args: argparse.Namespace) -> int:
    from infra import skypilot
    from infra.credentials import require_gcp

    shell.check_name(args.name, "RUN")
    if args.action == "status":
        command = skypilot.status_command()
    elif args.action == "logs":
        command = skypilot.logs_command(args.name, follow=args.follow, controller=args.controller)
    else:
        command = skypilot.stop_command(args.name)
    out = _out_dir(args, args.name)
    _write(os.path.join(out, "commands.sh"), _commands_sh([shell.line(command)], [f"sr cloud {args.action} {args.name}"]),
           executable=True)
    _print_plan(out, [command], args.dry_run)
    if args.dry_run:
        return 0
    sky = require_gcp("sky")
    if args.action != "status":
        return _run(sky, command).returncode
    # The queue lists every managed job: keep its header and this run's rows.
    done = _run(sky, command, capture=True)
    sys.stderr.write(done.stderr)
    lines = done.stdout.splitlines()
    rows = [line for line in lines if args.name in line.split()]
    header = [line for line in lines if "NAME" in line.split() and "ID" in line.split()][:1]
    print("\n".join(header + rows) if rows else f"no managed job named {args.name} (sky jobs queue --all lists all)")
    return done.returncode


# --- sr cloud gpu-check ------------------------------------------------------------------


def run_gpu_check(args: argparse.Namespace) -> int:
    from infra import skypilot
    from infra.credentials import require_gcp

    task = skypilot.gpu_check_task(args.gpus, args.spot, args.region, args.table, project_dir())
    out = _out_dir(args, skypilot.GPU_CHECK_CLUSTER)
    task_path = os.path.join(out, "task.yaml")
    _write(task_path, "# SkyPilot task written by `sr cloud gpu-check`: the GPU check on one VM.\n" + dump_yaml(task))
    command = skypilot.gpu_check_launch_command(task_path)
    _write(os.path.join(out, "commands.sh"),
           _commands_sh([shell.line(command)], ["the VM is deleted when the check ends (--down)"]), executable=True)
    print(f"SkyPilot task: {task_path} (1 VM, {args.gpus}{', spot' if args.spot else ''}); the table goes to "
          f"{args.table} on the VM and into the log")
    _print_plan(out, [command], args.dry_run)
    if args.dry_run:
        return 0
    sky = require_gcp("sky")
    return _run(sky, command).returncode


# --- sr cloud ray-config / batch ---------------------------------------------------------


def run_ray_config(args: argparse.Namespace) -> int:
    from infra import raycluster
    from infra.credentials import gcloud_project

    spec = raycluster.ClusterSpec(
        project_id=args.project or gcloud_project(), region=args.region, zone=args.zone, name=args.name, gpu=args.gpu,
        gpus_per_worker=args.gpus_per_worker, cpus_per_gpu=args.cpus_per_gpu, min_workers=args.min_workers,
        max_workers=args.max_workers, spot=args.spot, disk_gb=args.disk_gb,
        source_image=args.source_image or raycluster.DEFAULT_SOURCE_IMAGE, docker_image=args.image,
        worker_service_account=args.service_account,
    )
    text = "# Ray cluster launcher config written by `sr cloud ray-config`: ray up / ray down use it.\n"
    text += dump_yaml(raycluster.cluster_config(spec, project_dir()))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        _write(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def load_cluster_config(path: str) -> dict:
    """Read CLUSTER.yaml and check it with Ray's own validator (as ``ray up`` would)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such cluster config (make one with `sr cloud ray-config > {path}`)")
    with open(path) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    try:
        import jsonschema
        from ray.autoscaler._private.util import validate_config
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'sr-cloud[batch]'") from None
    try:
        validate_config(config)
    except (jsonschema.ValidationError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"{path}: not a valid Ray cluster config: {first}") from None
    # The name reaches `ray up`'s commands and commands.sh.
    shell.check_id(str(config.get("cluster_name", "")), f"{path}: cluster_name")
    return config


def _remote(url: str, what: str) -> None:
    from sr_core import storage

    if storage.is_local(url):
        raise ValueError(f"{what} {url!r}: the cluster cannot read this machine's files; use a bucket URL (gs://...)")


def check_batch_arguments(entrypoint: list[str], sr_parser: argparse.ArgumentParser) -> None:
    """Parse the job's ``sr batch ...`` here with the ``sr`` parser itself, so a wrong option
    fails now, in one line, rather than on the cluster."""
    import contextlib
    import io

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            sr_parser.parse_args(entrypoint[1:])
    except SystemExit:
        last = errors.getvalue().strip().splitlines()[-1:] or ["invalid arguments"]
        raise ValueError(f"--batch-args: {last[0]}") from None


def _batch_format(batch_args: str) -> str:
    """The output format that ``--batch-args`` asks ``sr batch`` for (``-f`` / ``--format``)."""
    tokens, fmt = shlex.split(batch_args), "png"
    for i, token in enumerate(tokens):
        if token in ("-f", "--format") and i + 1 < len(tokens):
            fmt = tokens[i + 1]
        elif token.startswith("--format="):
            fmt = token.split("=", 1)[1]
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower())
    return fmt if fmt in ("png", "jpeg", "webp") else "png"  # sr batch's parser refuses the others


def run_batch(args: argparse.Namespace) -> int:
    import json
    import time

    from infra import raycluster
    from infra.credentials import require_gcp

    _remote(args.input, "INPUT")
    _remote(args.output, "OUTPUT")
    _remote(args.model, "--model")
    cluster = load_cluster_config(args.cluster)
    cluster_ray = check_ray_version(cluster, args.cluster)
    submission_id = shell.check_id(args.submission_id or time.strftime("sr-batch-%Y%m%d-%H%M%S", time.gmtime()),
                                   "--submission-id")
    job = raycluster.BatchJob(
        input=args.input, output=args.output, model=args.model, cluster_yaml=args.cluster,
        submission_id=submission_id, batch_args=tuple(shlex.split(args.batch_args)), project_dir=project_dir(),
        max_gpus=raycluster.max_gpus(cluster), cpus_per_gpu=raycluster.cpus_per_gpu(cluster),
        generator=args.generator, output_format=_batch_format(args.batch_args),
    )
    check_batch_arguments(raycluster.batch_entrypoint(job), args.sr_parser)
    out = _out_dir(args, submission_id)
    _write(os.path.join(out, "runtime_env.json"), json.dumps(raycluster.runtime_env(job), indent=2) + "\n")
    notes = [f"cluster {cluster['cluster_name']}: `ray up` runs only when `ray get-head-ip` finds no head"]
    _write(os.path.join(out, "commands.sh"), raycluster.commands_script(job, cluster_ray, notes), executable=True)
    print(f"cluster: {args.cluster} ({cluster['cluster_name']}, Ray {cluster_ray or 'version not stated'}); "
          f"runtime env: {os.path.join(out, 'runtime_env.json')}")
    print(f"images: {job.output}/<same relative paths>; metrics.parquet, failures.parquet, summary.json and "
          f"TensorBoard events: {job.output.rstrip('/')}/_sr_batch/{submission_id}/ (sr tensorboard {job.output})")
    print("PORT: a free local port, chosen when the tunnel to the head's job server starts")
    _print_plan(out, raycluster.submit_commands(job, "PORT"), args.dry_run)
    if args.dry_run:
        return 0
    ray = require_gcp("ray")
    get_ip, up, *_ = raycluster.submit_commands(job, 0)
    if _run(ray, get_ip, capture=True).returncode != 0:
        if _run(ray, up).returncode != 0:
            raise ValueError(f"`ray up {args.cluster}` failed; its output is above")
    port = submit_through_tunnel(ray, job, cluster_ray)
    logs = raycluster.submit_commands(job, port)[-1]
    print(f"submitted {submission_id}; follow it with `{shell.line(logs)}` while "
          f"`ray dashboard --port {port} {args.cluster}` runs in another terminal")
    return 0


def check_ray_version(cluster: dict, path: str) -> str | None:
    """The cluster's Ray version; ValueError when this machine's Ray differs (Ray's job
    client and cluster launcher must match the cluster)."""
    from importlib.metadata import PackageNotFoundError, version

    from infra import raycluster

    wanted = raycluster.cluster_ray_version(cluster)
    try:
        here = version("ray")
    except PackageNotFoundError:
        raise ValueError("Ray is not installed: pip install 'sr-cloud[batch]'") from None
    if wanted and here != wanted:
        raise ValueError(f"{path} installs Ray {wanted} but this machine has Ray {here}: the job client must match "
                         f"the cluster; pip install 'ray[default]=={wanted}' here or regenerate {path}")
    return wanted


def job_server_version(address: str) -> str | None:
    """The Ray version a Ray job server at ``address`` reports (``/api/version``), or None
    when nothing, or something else, answers there."""
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(f"{address}/api/version", timeout=5) as reply:
            found = json.loads(reply.read()).get("ray_version")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def submit_through_tunnel(ray: str, job, cluster_ray: str | None, wait_s: float = 120.0) -> int:
    """Forward the head's job server to a free local port with ``ray dashboard`` (an SSH
    tunnel), submit through it once it answers as Ray's job server of the cluster's Ray
    version, and close it. A port that was free just before the tunnel opened cannot be
    a local Ray's (8265, where one listens by default, is never used); an answer while
    the tunnel process is gone is refused. Returns the port."""
    import subprocess
    import time

    from infra import raycluster
    from sr_core.net import free_port

    port = free_port()
    _, _, dashboard, submit, _ = raycluster.submit_commands(job, port)
    address = f"http://127.0.0.1:{port}"
    tunnel = subprocess.Popen([ray, *dashboard[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            found = job_server_version(address)
            if tunnel.poll() is not None:
                raise ValueError(f"`ray dashboard` (the tunnel to the head) exited: "
                                 f"{' '.join(tunnel.stderr.read().split())[-500:] or 'no output'}")
            if found is not None:
                if cluster_ray and found != cluster_ray:
                    raise ValueError(f"the tunnel on 127.0.0.1:{port} answers as Ray {found}, not the cluster's "
                                     f"{cluster_ray}: nothing was submitted")
                break
            if time.monotonic() > deadline:
                raise ValueError(f"the cluster's job server did not answer through the tunnel on 127.0.0.1:{port} "
                                 f"within {wait_s:.0f} s")
            time.sleep(1)
        if _run(ray, submit).returncode != 0:
            raise ValueError("`ray job submit` failed; its output is above")
    finally:
        tunnel.terminate()
        try:
            tunnel.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tunnel.kill()
            tunnel.wait()
    return port


# --- sr cloud doctor ------------------------------------------------------------------------


def doctor_plan(args: argparse.Namespace):
    """What `sr cloud doctor` checks, from its arguments and CLUSTER.yaml."""
    from infra import doctor, image, skypilot
    from infra.credentials import gcloud_project

    cluster = load_cluster_config(args.cluster) if args.cluster else None
    if cluster is not None and cluster.get("provider", {}).get("type") != "gcp":
        raise ValueError(f"{args.cluster}: not a Google Cloud cluster config (provider.type is not gcp)")
    project = args.project or (cluster or {}).get("provider", {}).get("project_id") or gcloud_project()
    if not project:
        raise ValueError("no GCP project: pass --project or run `gcloud config set project PROJECT`")
    region = args.region or (cluster["provider"]["region"] if cluster else "us-central1")
    if args.zone and not args.zone.startswith(region + "-"):
        raise ValueError(f"--zone {args.zone} is not in --region {region}")
    if args.bucket:
        shell.check_bucket(args.bucket)
    train = None
    if args.train:
        train = skypilot.TrainJob(name="doctor", bucket=args.bucket or "gs://unchecked", nodes=args.nodes,
                                  gpus=args.gpus, spot=args.spot, region=region, zone=args.zone,
                                  disk_size=args.disk_size, local_ssd=args.local_ssd, image_id=args.image)
        skypilot.check_job(train)
        kind, count = train.accelerator
        skypilot.host_machine_type(kind, count)
        if kind.upper() not in doctor.GPU_TYPES:
            raise ValueError(f"--gpus {args.gpus}: sr cloud doctor knows {', '.join(doctor.GPU_TYPES)}")
    elif not cluster:
        raise ValueError("--no-train without --cluster: nothing to check")
    images = []
    if train and image.docker_image(args.image):
        images.append(image.docker_image(args.image))
    cluster_image = (cluster or {}).get("docker", {}).get("image", "")
    if cluster_image and cluster_image not in images:
        images.append(cluster_image)
    plan = doctor.Plan(project=project, region=region, bucket=args.bucket, train=train, cluster=cluster,
                       cluster_path=args.cluster, images=images)
    # These reach API URLs and the printed fix commands.
    shell.check_match(shell.PROJECT, plan.project, "project", "my-project-123")
    shell.check_match(shell.LOCATION, plan.region, "region", "us-central1")
    if cluster:
        shell.check_match(shell.LOCATION, str(cluster["provider"].get("availability_zone", "")),
                          f"{args.cluster}: provider.availability_zone", "us-central1-a")
    for email in plan.service_accounts():
        shell.check_match(shell.EMAIL, email, "service account", "sr-workers@my-project.iam.gserviceaccount.com")
    for ref in images:
        image.split_image(ref)
    return plan


def run_doctor(args: argparse.Namespace) -> int:
    from infra import doctor
    from infra.credentials import gcp_credentials

    plan = doctor_plan(args)
    print("sr cloud doctor: " + "\n  ".join(doctor.describe(plan)))
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    credentials = gcp_credentials()
    if args.dry_run or credentials is None:
        print("would check:" if args.dry_run else "would check, with credentials:")
        for line in doctor.would_check(plan):
            print("  " + line)
        sys.stdout.flush()
        if args.dry_run:
            return 0
        if key:
            raise ValueError(f"GOOGLE_APPLICATION_CREDENTIALS={key}: no such file; nothing was checked")
        raise ValueError("no Google Cloud credentials: run `gcloud auth application-default login` (or set "
                         "GOOGLE_APPLICATION_CREDENTIALS to a key file); nothing was checked")
    api = doctor.Api(doctor.load_credentials(credentials))
    checks = doctor.run_checks(api, plan)
    for check in checks:
        print(f"{check.status:<5} {check.what}")
        if check.fix and check.status != "ok":
            print(f"      fix: {check.fix}")
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print(f"{len(checks)} checks: {failed} failed, {warned} warnings"
          + ("" if failed else "; nothing found that would stop a launch"))
    return 1 if failed else 0


# --- sr tensorboard -----------------------------------------------------------------------


def run_tensorboard(args: argparse.Namespace) -> int:
    import time

    from infra.tensorboard import check_port, resolve_logdir, start

    check_port(args.port)  # before the run directory is listed (a bucket listing takes seconds)
    logdir = resolve_logdir(args.target)
    _, url = start(logdir, host=args.host, port=args.port, reload_interval=args.reload_interval)
    print(f"TensorBoard on {logdir}: {url} (Ctrl-C stops it)", flush=True)
    while True:
        time.sleep(3600)
