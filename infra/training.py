"""Training on SkyPilot from this machine: ``sr cloud train`` (write the task, check the
config, refuse a second job of the same name, submit), ``status`` / ``logs`` / ``stop``
of the managed job, and ``gpu-check`` (the GPU check on one VM).

Each writes what it generated and the exact commands into its output folder and prints
them; with ``dry_run`` it stops there, without it checks for the tool and Google Cloud
credentials (local files only) before running anything."""

from __future__ import annotations

import os
import sys

from infra import image, shell, skypilot
from infra.credentials import require_gcp
from infra.outfolder import commands_sh, dump_yaml, out_dir, print_plan, project_dir, run_tool, write


def check_training_config(job: skypilot.TrainJob) -> str:
    """Load the config here as the nodes will (preset, file, overrides), so a typo fails
    now rather than after the VMs are paid for. Returns what was checked."""
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


def train_job(items: list[str], max_restarts_on_errors: int | None = None, **fields) -> skypilot.TrainJob:
    """The managed job of ``sr cloud train ITEMS``: ``items`` are the config file and
    overrides as for ``sr train``, ``fields`` the other fields of ``TrainJob`` (name,
    bucket, shape, image...). A local config file is checked to exist and made absolute."""
    from jobs.config import split_config_args

    config, overrides = split_config_args(items)
    config = config or ""
    if config and "://" not in config:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{config}: no such config file")
        config = os.path.abspath(config)
    login_from_env = False
    if image.docker_image(fields.get("image_id", "")):
        host, _, _ = image.split_image(image.docker_image(fields["image_id"]))
        login_from_env = not image.is_artifact_registry(host) and "SKYPILOT_DOCKER_PASSWORD" in os.environ
    restarts = skypilot.MAX_RESTARTS_ON_ERRORS if max_restarts_on_errors is None else max_restarts_on_errors
    return skypilot.TrainJob(config=config, overrides=overrides, workdir=project_dir(),
                             max_restarts_on_errors=restarts, registry_login_from_env=login_from_env, **fields)


def submit_train(items: list[str], out: str | None = None, dry_run: bool = False,
                 max_restarts_on_errors: int | None = None, **fields) -> int:
    """``sr cloud train``: the job of :func:`train_job`; write task.yaml, run.sh, setup.sh
    and commands.sh, print the plan, and (without ``dry_run``) submit the job unless one
    of its name has not finished."""
    job = train_job(items, max_restarts_on_errors, **fields)
    task = skypilot.build_task(job)
    checked = check_training_config(job)
    out = out_dir(out, job.name)
    task_path = os.path.join(out, "task.yaml")
    write(task_path, dump_yaml(task))
    write(os.path.join(out, "run.sh"), task["run"], executable=True)
    write(os.path.join(out, "setup.sh"), "#!/usr/bin/env bash\n" + task["setup"], executable=True)
    command = skypilot.launch_command(task_path, job)
    queue = skypilot.active_jobs_command()
    # The JSON is indented: each record's '"job_name": "NAME"' is on a line of its own.
    pattern = '"job_name": "%s"' % job.name
    message = f"a managed job named {job.name} has not finished: sr cloud status {job.name}"
    guard = [f"if {shell.line(queue)} | grep -qF {shell.word(pattern)}; then",
             f"  echo {shell.word(message)} >&2", "  exit 2", "fi"]
    write(os.path.join(out, "commands.sh"),
          commands_sh(guard + [shell.line(command)],
                      [f"run directory: {job.run_dir}",
                       "refused while a job of the same name has not finished (it would share the run directory)"]),
          executable=True)
    _describe_train(job, task, task_path, checked)
    print_plan(out, [queue, command], dry_run)
    if dry_run:
        return 0
    sky = require_gcp("sky")
    refuse_if_running(sky, job.name, job.run_dir)
    done = run_tool(sky, command)
    if done.returncode != 0:
        raise ValueError(f"`sky jobs launch` failed (exit {done.returncode}); its output is above")
    print(f"submitted {job.name}: sr cloud logs {job.name} | sr cloud status {job.name} | "
          f"sr tensorboard {job.run_dir}")
    return 0


def _describe_train(job: skypilot.TrainJob, task: dict, task_path: str, checked: str) -> None:
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
    elif image.docker_image(job.image_id):
        print("registry login: none (a public image; for a private registry export SKYPILOT_DOCKER_USERNAME "
              "and SKYPILOT_DOCKER_PASSWORD first)")


def refuse_if_running(sky: str, name: str, run_dir: str) -> None:
    """ValueError when a managed job called ``name`` has not finished: a second one would
    write checkpoints into the same run directory."""
    done = run_tool(sky, skypilot.active_jobs_command(), capture=True)
    if done.returncode != 0:
        raise ValueError(f"`sky jobs queue` failed (exit {done.returncode}): "
                         f"{' '.join(done.stderr.split())[-300:] or 'no output'}")
    active = skypilot.active_jobs(done.stdout, name)
    if active:
        job_id, state = active[0]
        raise ValueError(f"managed job {name} (id {job_id}) is {state}: a second one would share {run_dir}; "
                         f"follow it (sr cloud logs {name}), stop it (sr cloud stop {name}) or use another --name")


def job_action(action: str, name: str, follow: bool = True, controller: bool = False, out: str | None = None,
               dry_run: bool = False) -> int:
    """``sr cloud status|logs|stop RUN``: SkyPilot's command for the managed job ``name``."""
    shell.check_name(name, "RUN")
    if action == "status":
        command = skypilot.status_command()
    elif action == "logs":
        command = skypilot.logs_command(name, follow=follow, controller=controller)
    else:
        command = skypilot.stop_command(name)
    out = out_dir(out, name)
    write(os.path.join(out, "commands.sh"), commands_sh([shell.line(command)], [f"sr cloud {action} {name}"]),
          executable=True)
    print_plan(out, [command], dry_run)
    if dry_run:
        return 0
    sky = require_gcp("sky")
    if action != "status":
        return run_tool(sky, command).returncode
    # The queue lists every managed job: keep its header and this run's rows.
    done = run_tool(sky, command, capture=True)
    sys.stderr.write(done.stderr)
    lines = done.stdout.splitlines()
    rows = [line for line in lines if name in line.split()]
    header = [line for line in lines if "NAME" in line.split() and "ID" in line.split()][:1]
    print("\n".join(header + rows) if rows else f"no managed job named {name} (sky jobs queue --all lists all)")
    return done.returncode


def submit_gpu_check(gpus: str, spot: bool, region: str, table: str, out: str | None = None,
                     dry_run: bool = False) -> int:
    """``sr cloud gpu-check``: the GPU check on one VM, deleted when it ends."""
    task = skypilot.gpu_check_task(gpus, spot, region, table, project_dir())
    out = out_dir(out, skypilot.GPU_CHECK_CLUSTER)
    task_path = os.path.join(out, "task.yaml")
    write(task_path, "# SkyPilot task written by `sr cloud gpu-check`: the GPU check on one VM.\n" + dump_yaml(task))
    command = skypilot.gpu_check_launch_command(task_path)
    write(os.path.join(out, "commands.sh"),
          commands_sh([shell.line(command)], ["the VM is deleted when the check ends (--down)"]), executable=True)
    print(f"SkyPilot task: {task_path} (1 VM, {gpus}{', spot' if spot else ''}); the table goes to "
          f"{table} on the VM and into the log")
    print_plan(out, [command], dry_run)
    if dry_run:
        return 0
    sky = require_gcp("sky")
    return run_tool(sky, command).returncode
