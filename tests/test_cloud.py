"""`sr cloud` and `sr tensorboard`, offline: what would be submitted is generated and
checked with the engines' own validators (SkyPilot's task schema, Ray's cluster-config
schema), the generated scripts with bash -n and shellcheck, the commands of
docs/CLOUD.md run as dry runs, and without credentials every command fails at once.
Every `sr` subprocess gets an environment whose proxies point at a closed loopback port
and whose HOME and gcloud folder are empty, so nothing can reach a cloud."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cloudenv import offline_env, sr  # noqa: F401 (fixtures)
from events import HANG_TIMEOUT, wait_for
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sr_process(args, env, timeout=60):
    """The installed `sr` executable as a child process."""
    return subprocess.run([str(BIN / "sr"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_shell(paths):
    for path in paths:
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, (path, done.stderr)
    done = subprocess.run([str(BIN / "shellcheck"), *map(str, paths)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


_VALIDATE_TASKS = """
import dataclasses, json, os, sys, yaml, sky
out = []
for path in sys.argv[1:]:
    config = yaml.safe_load(open(path))
    # What `sky jobs launch --secret NAME` adds: NAME's value from the environment.
    overrides = [(k, os.environ[k]) for k, v in (config.get("secrets") or {}).items() if v is None]
    task = sky.Task.from_yaml_config(config, secrets_overrides=overrides or None)
    (r,) = task.resources
    login = r.docker_login_config
    out.append({"num_nodes": task.num_nodes, "accelerators": r.accelerators, "spot": r.use_spot,
                "cloud": str(r.cloud), "region": r.region, "zone": r.zone, "image_id": r.image_id,
                "job_recovery": r.job_recovery, "docker_login": login and dataclasses.asdict(login)})
try:
    sky.Task.from_yaml_config({"name": "x", "resources": {"acelerators": "V100:4"}})
except Exception as exc:
    out.append(str(exc))
print(json.dumps(out))
"""


def validate_with_skypilot(paths, env):
    """SkyPilot's own task validation, in a child process (importing sky writes ~/.sky),
    and what it makes of the resources: the parsed job recovery and docker login."""
    done = subprocess.run([sys.executable, "-c", _VALIDATE_TASKS, *map(str, paths)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *tasks, typo = json.loads(done.stdout.strip().splitlines()[-1])
    assert "did you mean 'accelerators'" in typo  # the validator is strict, not a pass-through
    return tasks


# --- the GPU check on one VM ----------------------------------------------------------------


def test_gpu_check_dry_run_writes_a_task_for_one_v100(tmp_path, offline_env, sr):
    out = tmp_path / "out"
    done = sr(["cloud", "gpu-check", "--table", "gs://bucket/gpu-check/v100.md", "--dry-run", "--out", out])
    assert done.returncode == 0, done.stderr
    task_path = out / "task.yaml"
    assert f"sky launch -c sr-gpu-check {task_path} --down --yes" in done.stdout
    assert "nothing was submitted" in done.stdout
    task = yaml.safe_load(task_path.read_text())
    assert task["workdir"] == str(ROOT)
    assert "-m infra.gpucheck --out gs://bucket/gpu-check/v100.md" in task["run"]
    assert "--index-url https://download.pytorch.org/whl/cu126" in task["setup"]  # V100 kernels
    scripts = []
    for name in ("setup", "run"):
        scripts.append(tmp_path / f"{name}.sh")
        scripts[-1].write_text("#!/usr/bin/env bash\n" + task[name])
    check_shell(scripts + [out / "commands.sh"])
    (parsed,) = validate_with_skypilot([task_path], offline_env)
    assert parsed["accelerators"] == {"V100": 1} and parsed["spot"] is False and parsed["num_nodes"] == 1
    bad = sr(["cloud", "gpu-check", "--gpus", "V100:x", "--dry-run", "--out", tmp_path / "bad"])
    assert bad.returncode == 2 and "--gpus 'V100:x': use TYPE:COUNT" in bad.stderr


# --- training on SkyPilot -----------------------------------------------------------------


def test_train_dry_run_writes_a_task_skypilot_accepts(tmp_path, offline_env, sr, monkeypatch):
    config = tmp_path / "psnr.yaml"
    config.write_text("data:\n  gt_size: 64\n")
    runs = {}
    for name, extra in {
        "multi": ["--nodes", "2", "--gpus", "V100:4", "--spot", "--zone", "us-central1-a"],
        "single": ["--gpus", "V100", "--no-local-ssd", "--image", "docker:us-docker.pkg.dev/p/sr/sr-cloud:0.1.0",
                   "--max-restarts-on-errors", "10"],
        "ds": ["--nodes", "2", "--gpus", "V100:8", "--launch-config", "jobs/launch/deepspeed_zero2_8_gpus.yaml"],
        "private": ["--image", "ghcr.io/acme/sr-cloud:0.1.0"],
        "public": ["--image", "docker:nvidia/cuda:12.6.3-base-ubuntu22.04"],
    }.items():
        out = tmp_path / name
        backend = ["train.backend=deepspeed"] if name == "ds" else []
        if name == "private":  # the login of a registry outside Google, from this shell
            monkeypatch.setenv("SKYPILOT_DOCKER_USERNAME", "acme-bot")
            monkeypatch.setenv("SKYPILOT_DOCKER_PASSWORD", "ghp_not-a-real-token")
        done = sr(["cloud", "train", str(config), "data.train_shards=gs://b/div2k-sub", "data.batch_size=8", *backend,
                   "--preset", "tiny", "--name", f"esrgan-{name}", "--bucket", "gs://b", *extra,
                   "--dry-run", "--out", str(out)])
        monkeypatch.delenv("SKYPILOT_DOCKER_USERNAME", raising=False)
        monkeypatch.delenv("SKYPILOT_DOCKER_PASSWORD", raising=False)
        assert done.returncode == 0, done.stderr
        secrets = " --secret SKYPILOT_DOCKER_USERNAME --secret SKYPILOT_DOCKER_PASSWORD" if name == "private" else ""
        assert f"sky jobs launch {out}/task.yaml --name esrgan-{name} --yes --detach-run{secrets}" in done.stdout
        assert "config checked" in done.stdout
        if name == "multi":  # the VM SkyPilot picks for V100:4 (4 GB per vCPU: n1-highmem)
            assert "(2 x V100:4 on n1-highmem-32, spot; restarts on errors: 3;" in done.stdout
        runs[name] = out

    env = dict(offline_env, SKYPILOT_DOCKER_USERNAME="acme-bot", SKYPILOT_DOCKER_PASSWORD="ghp_not-a-real-token")
    multi, single, ds, private, public = validate_with_skypilot(
        [runs[n] / "task.yaml" for n in ("multi", "single", "ds", "private", "public")], env)
    assert multi == {"num_nodes": 2, "accelerators": {"V100": 4}, "spot": True, "cloud": "GCP",
                     "region": "us-central1", "zone": "us-central1-a", "image_id": None,
                     "job_recovery": {"strategy": None, "max_restarts_on_errors": 3}, "docker_login": None}
    assert single["num_nodes"] == 1 and single["accelerators"] == {"V100": 1} and single["spot"] is False
    assert list(single["image_id"].values()) == ["docker:us-docker.pkg.dev/p/sr/sr-cloud:0.1.0"]
    # The managed job restarts after errors of its own, not only after preemptions.
    assert single["job_recovery"] == {"strategy": None, "max_restarts_on_errors": 10}  # SkyPilot's default strategy
    assert ds["job_recovery"] == {"strategy": None, "max_restarts_on_errors": 3}
    # Artifact Registry: the server with an empty password, which makes SkyPilot run
    # `gcloud auth configure-docker us-docker.pkg.dev` on the VM (its service account pulls).
    assert single["docker_login"] == {"username": "", "password": "", "server": "us-docker.pkg.dev"}
    # Another private registry: logged in with this shell's variables, passed as secrets.
    assert private["docker_login"] == {"username": "acme-bot", "password": "ghp_not-a-real-token",
                                       "server": "ghcr.io"}
    assert public["docker_login"] is None and list(public["image_id"].values()) == [
        "docker:nvidia/cuda:12.6.3-base-ubuntu22.04"]
    private_files = "".join(p.read_text() for p in runs["private"].iterdir())
    assert "ghp_not-a-real-token" not in private_files  # the password is never written
    assert yaml.safe_load((runs["private"] / "task.yaml").read_text())["secrets"] == {
        "SKYPILOT_DOCKER_USERNAME": None, "SKYPILOT_DOCKER_PASSWORD": None, "SKYPILOT_DOCKER_SERVER": "ghcr.io"}

    task = yaml.safe_load((runs["multi"] / "task.yaml").read_text())
    assert task["workdir"] == str(ROOT)
    assert task["file_mounts"] == {"~/sr-job/config.yaml": str(config)}
    assert task["resources"]["volumes"] == [{"path": "/mnt/local-ssd", "storage_type": "instance"}]
    run = task["run"]
    assert (runs["multi"] / "run.sh").read_text() == run
    # The config arguments go through as given, then the cache, the run dir and the resume.
    assert '-m jobs.train --preset tiny "$HOME/sr-job/config.yaml" data.train_shards=gs://b/div2k-sub data.batch_size=8' in run
    assert '"data.cache_dir=$SR_LOCAL_DISK/sr-shards"' in run
    assert run.rstrip().endswith("train.run_dir=gs://b/runs/esrgan-multi --resume auto")
    for variable in ("SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE"):
        assert variable in run
    assert "torch==2.13.0\" --index-url https://download.pytorch.org/whl/cu126" in task["setup"]
    single_run = (runs["single"] / "run.sh").read_text()
    assert "data.cache_dir" not in single_run and "sudo" not in single_run  # --no-local-ssd: default cache
    assert ds["num_nodes"] == 2 and ds["accelerators"] == {"V100": 8}
    check_shell([runs[n] / f for n in runs for f in ("run.sh", "setup.sh", "commands.sh")])

    # What the scripts hand to `accelerate launch` on node 1 of 2, as bash expands it,
    # read back by Accelerate's own argument parser.
    from accelerate.commands.launch import launch_command_parser

    fake = tmp_path / "venv" / "bin" / "accelerate"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(offline_env, SR_VENV=str(tmp_path / "venv"), SR_LOCAL_DISK=str(tmp_path / "ssd"),
               SKYPILOT_NODE_RANK="1", SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_IPS="10.0.0.2\n10.0.0.3")
    launched = {}
    for name, gpus in (("multi", "4"), ("ds", "8")):
        done = subprocess.run(["bash", str(runs[name] / "run.sh")], env=dict(env, SKYPILOT_NUM_GPUS_PER_NODE=gpus),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        launched[name] = launch_command_parser().parse_args(done.stdout.splitlines()[1:])  # after "launch"
    multi_args, ds_args = launched["multi"], launched["ds"]
    assert (multi_args.multi_gpu, multi_args.num_machines, multi_args.machine_rank, multi_args.num_processes,
            multi_args.main_process_ip, multi_args.main_process_port) == (True, 2, 1, 8, "10.0.0.2", 29500)
    assert multi_args.module and multi_args.training_script == "jobs.train"
    assert multi_args.training_script_args == [
        "--preset", "tiny", f"{tmp_path / 'home'}/sr-job/config.yaml", "data.train_shards=gs://b/div2k-sub",
        "data.batch_size=8", f"data.cache_dir={tmp_path / 'ssd'}/sr-shards", "train.run_dir=gs://b/runs/esrgan-multi",
        "--resume", "auto"]
    # A launch config keeps its own kind of launch (DeepSpeed here): no --multi_gpu over it.
    assert ds_args.config_file == "jobs/launch/deepspeed_zero2_8_gpus.yaml" and not ds_args.multi_gpu
    assert (ds_args.num_machines, ds_args.machine_rank, ds_args.num_processes) == (2, 1, 16)


def test_train_refuses_bad_arguments_in_one_line(tmp_path, offline_env, sr):
    base = ["cloud", "train", "--name", "r1", "--bucket", "gs://b", "--dry-run", "--out", str(tmp_path)]
    cases = {
        ("--preset", "tiny", "data.gt_sise=64"): "data.gt_sise",       # the config loader's own check
        ("--preset", "tiny", "data.batch_size=many"): "data.batch_size",
        ("--preset", "nope"): "nope",
        ("train.run_dir=gs://x/y",): "--bucket and --name",
        ("missing.yaml",): "missing.yaml",
        ("--gpus", "V100:four"): "--gpus",
        ("--launch-config", "jobs/launch/none.yaml"): "jobs/launch/none.yaml",
        # A launch config that cannot use the GPUs asked for (it would silently train on one).
        ("--gpus", "V100:4", "--launch-config", "jobs/launch/one_gpu.yaml"): "runs one process (distributed_type NO) "
                                                                            "but the task has 1 x V100:4 = 4 GPUs",
        ("--nodes", "2", "--launch-config", "jobs/launch/one_gpu.yaml"): "2 x V100:1 = 2 GPUs",
        ("--launch-config", "jobs/launch/one_vm_8_gpus.yaml"): "is a multi-GPU launch but the task has 1 x V100:1",
        ("--max-restarts-on-errors", "-1"): "--max-restarts-on-errors",
        ("--image", "docker:"): "--image",
    }
    for extra, named in cases.items():
        done = sr([*base, *extra])
        assert done.returncode == 2, (extra, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr, (extra, done.stderr)
    done = sr(["cloud", "train", "--name", "Bad_Name", "--bucket", "gs://b", "--dry-run"])
    assert done.returncode == 2 and "--name" in done.stderr
    done = sr(["cloud", "train", "--name", "ok", "--bucket", "/local/folder", "--dry-run"])
    assert done.returncode == 2 and "--bucket" in done.stderr


def test_job_commands_map_onto_managed_jobs(tmp_path, offline_env, sr):
    expected = {
        "status": "sky jobs queue --all",
        "logs": "sky jobs logs --name esrgan-psnr --follow",
        "stop": "sky jobs cancel --name esrgan-psnr --yes",
    }
    for action, command in expected.items():
        done = sr(["cloud", action, "esrgan-psnr", "--dry-run", "--out", str(tmp_path / action)])
        assert done.returncode == 0, done.stderr
        assert "  " + command in done.stdout.splitlines()
        assert (tmp_path / action / "commands.sh").read_text().rstrip().endswith(command)
    done = sr(["cloud", "logs", "esrgan-psnr", "--no-follow", "--controller", "--dry-run",
               "--out", str(tmp_path / "c")])
    assert "  sky jobs logs --name esrgan-psnr --no-follow --controller" in done.stdout.splitlines()


_QUEUE_JSON = """
import json
from sky.jobs.state import ManagedJobStatus
from sky.schemas.api.responses import ManagedJobRecord
records = [
    ManagedJobRecord(job_id=7, task_id=0, job_name="esrgan-psnr", task_name="esrgan-psnr",
                     status=ManagedJobStatus.RECOVERING, recovery_count=2, submitted_at=1764950000.0),
    ManagedJobRecord(job_id=8, task_id=0, job_name="esrgan-psnr-2x4", task_name="esrgan-psnr-2x4",
                     status=ManagedJobStatus.RUNNING, recovery_count=0, submitted_at=1764951000.0),
]
print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
"""


def fake_tool(folder: Path, name: str, body: str) -> Path:
    """A stand-in for a cloud CLI (``sky``, ``ray``): a Python script on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


FAKE_SKY = """
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["jobs", "queue"]:
    sys.stdout.write(open(os.environ["FAKE_SKY_QUEUE"]).read())
"""


def test_a_second_job_of_the_same_name_is_refused(tmp_path, offline_env, sr, monkeypatch):
    """`sr cloud train --name X` while a managed job X has not finished would put two jobs
    on one run directory: refused, from `sky jobs queue --output json` as SkyPilot's own
    record model writes it, both by `sr cloud train` and by its commands.sh."""
    from infra.training import refuse_if_running

    done = subprocess.run([sys.executable, "-c", _QUEUE_JSON], env=offline_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    queue = tmp_path / "queue.json"
    queue.write_text(done.stdout)
    sky = fake_tool(tmp_path / "bin", "sky", FAKE_SKY)
    log = tmp_path / "sky.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_SKY_QUEUE", str(queue))
    with pytest.raises(ValueError, match=r"managed job esrgan-psnr \(id 7\) is RECOVERING: a second one would "
                                         r"share gs://b/runs/esrgan-psnr"):
        refuse_if_running(str(sky), "esrgan-psnr", "gs://b/runs/esrgan-psnr")
    refuse_if_running(str(sky), "esrgan-psnr-2", "gs://b/runs/esrgan-psnr-2")  # another name: fine
    assert json.loads(log.read_text().splitlines()[0]) == ["jobs", "queue", "--skip-finished", "--output", "json"]

    # commands.sh, as written, with `sky` on PATH: refused while the job runs, launched when not.
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for name, refused in (("esrgan-psnr", True), ("esrgan-gan", False)):
        out = tmp_path / name
        assert sr(["cloud", "train", "--preset", "tiny", "--name", name, "--bucket", "gs://b", "--dry-run",
                   "--out", out]).returncode == 0
        log.write_text("")
        done = subprocess.run(["bash", str(out / "commands.sh")], env=env, capture_output=True, text=True,
                              timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        if refused:
            assert done.returncode == 2 and f"a managed job named {name} has not finished" in done.stderr
            assert [c[:2] for c in calls] == [["jobs", "queue"]]
        else:
            assert done.returncode == 0, done.stderr
            assert calls[-1] == ["jobs", "launch", str(out / "task.yaml"), "--name", name, "--yes", "--detach-run"]


def test_without_credentials_every_command_fails_at_once(tmp_path, offline_env, sr, monkeypatch):
    cluster = tmp_path / "cluster.yaml"
    done = sr(["cloud", "ray-config", "--project", "p", "-o", cluster])
    assert done.returncode == 0, done.stderr
    commands = [
        ["cloud", "train", "--preset", "tiny", "--name", "r1", "--bucket", "gs://b"],
        ["cloud", "status", "r1"], ["cloud", "logs", "r1"], ["cloud", "stop", "r1"],
        ["cloud", "batch", "gs://in/a", "gs://out/a", "--model", "gs://m/x4.safetensors", "--cluster", cluster],
    ]
    for args in commands:  # the installed `sr`, timed from its start
        started = time.monotonic()
        done = sr_process([*args, "--out", tmp_path / "o"], offline_env)
        assert time.monotonic() - started < 15, args
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert "no Google Cloud credentials" in line and "gcloud auth application-default login" in line
    # A key file that is named but missing is called out by name.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    done = sr(["cloud", "status", "r1", "--out", tmp_path / "o"])
    assert done.returncode == 2 and "key.json: no such file" in done.stderr


# --- batch on a Ray cluster ---------------------------------------------------------------


def test_ray_config_passes_rays_validator(tmp_path, offline_env, sr):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for extra in ([], ["--spot", "--image", "us-docker.pkg.dev/p/sr/sr-cloud:0.1.0", "--min-workers", "1"]):
        done = sr(["cloud", "ray-config", "--project", "my-project", "--gpu", "nvidia-tesla-v100",
                   "--gpus-per-worker", "4", "--max-workers", "3", *extra])
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load(done.stdout)
        validate_config(config)
        validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` fills it
        worker = config["available_node_types"]["gpu_worker"]
        assert worker["resources"] == {"CPU": 32, "GPU": 4} and worker["max_workers"] == 3
        assert worker["node_config"]["guestAccelerators"] == [
            {"acceleratorType": "nvidia-tesla-v100", "acceleratorCount": 4}]
        assert worker["node_config"]["machineType"] == "n1-standard-32"
        assert ("provisioningModel" in worker["node_config"]["scheduling"]) == ("--spot" in extra)
        # Ray's GCP provider gives its service account to the head only: every worker node
        # type names one, with a scope that reaches Cloud Storage, and keeps it through the
        # defaults `ray up` fills in.
        for prepared in (config, prepare_config(copy.deepcopy(config))):
            workers = {n: t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]}
            assert workers
            for node_type in workers.values():
                (account,) = node_type["node_config"]["serviceAccounts"]
                assert account["email"] == "ray-autoscaler-sa-v1@my-project.iam.gserviceaccount.com"
                assert set(account["scopes"]) & {"https://www.googleapis.com/auth/cloud-platform",
                                                 "https://www.googleapis.com/auth/devstorage.read_write",
                                                 "https://www.googleapis.com/auth/devstorage.full_control"}
        # GPU workers wait for the driver the VM image installs on first boot; with an
        # Artifact Registry image every node configures docker for it before the pull.
        login = ["gcloud auth configure-docker us-docker.pkg.dev --quiet"] if "--image" in extra else []
        assert config["initialization_commands"] == login
        assert worker["initialization_commands"][0].startswith("timeout 600 bash -c 'until nvidia-smi")
        assert worker["initialization_commands"][1:] == login
        setup = "\n".join(config["setup_commands"])
        assert "torch==2.13.0" in setup and "whl/cu126" in setup and "ray[default]==2.60.0" in setup
        assert config["file_mounts"] == {"~/sr-cloud": str(ROOT)}
        script = tmp_path / "setup.sh"
        script.write_text("#!/usr/bin/env bash\n" + "\n".join(config["setup_commands"]) + "\n")
        check_shell([script])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(broken)
    done = sr(["cloud", "ray-config", "--project", "p", "--gpus-per-worker", "3"])
    assert done.returncode == 2 and "--gpus-per-worker" in done.stderr
    # Workers may run as another account of the user's.
    done = sr(["cloud", "ray-config", "--project", "p", "--service-account", "sr-workers@p.iam.gserviceaccount.com"])
    (account,) = yaml.safe_load(done.stdout)["available_node_types"]["gpu_worker"]["node_config"]["serviceAccounts"]
    assert account["email"] == "sr-workers@p.iam.gserviceaccount.com"
    done = sr(["cloud", "ray-config", "--project", "p", "--service-account", "sr-workers"])
    assert done.returncode == 2 and "--service-account" in done.stderr


def test_batch_dry_run_submits_sr_batch(tmp_path, offline_env, sr):
    cluster = tmp_path / "cluster.yaml"
    assert sr(["cloud", "ray-config", "--project", "p", "-o", str(cluster)]).returncode == 0
    out = tmp_path / "job"
    done = sr(["cloud", "batch", "gs://in/photos", "gs://out/photos", "--model", "gs://m/x4.safetensors",
               "--cluster", str(cluster), "--submission-id", "job1", "--dry-run", "--out", str(out),
               "--batch-args=--overwrite"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"  ray get-head-ip {cluster}" in lines and f"  ray up -y --no-restart {cluster}" in lines
    submit = next(line for line in lines if line.startswith("  ray job submit"))
    argv = shlex.split(submit)
    # The default cluster has 4 one-GPU workers at most: one actor per GPU, 1 to 4 of them;
    # each worker has 8 vCPUs per GPU, of which each actor's encoding gets what the cost
    # table says RRDBNet's PNG output needs beside a V100 (2, threads and CPUs), the rest
    # staying for decoding and Ray. Options given in --batch-args come last (win).
    assert argv[argv.index("--") + 1:] == ["sr", "batch", "gs://in/photos", "gs://out/photos", "--model",
                                           "gs://m/x4.safetensors", "--address", "auto", "--run-id", "job1",
                                           "--num-gpus-per-actor", "1", "--actors", "1,4",
                                           "--cpus-per-actor", "2", "--encode-threads", "2", "--overwrite"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env == json.loads((out / "runtime_env.json").read_text())
    assert runtime_env["working_dir"] == str(ROOT) and ".venv" in runtime_env["excludes"]
    assert "gs://out/photos/_sr_batch/job1/" in done.stdout
    check_shell([out / "commands.sh"])

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(cluster.read_text()), "max_wokers": 2}))
    old_ray = tmp_path / "old-ray.yaml"
    old_ray.write_text(cluster.read_text().replace("ray[default]==2.60.0", "ray[default]==2.59.0"))
    for args, named in (
        (["gs://in/a", "gs://out/a", "--model", "gs://m/x", "--cluster", str(bad)], "not a valid Ray cluster config"),
        (["gs://in/a", "gs://out/a", "--model", "gs://m/x", "--cluster", str(tmp_path / "no.yaml")], "no.yaml"),
        (["local/in", "gs://out/a", "--model", "gs://m/x", "--cluster", str(cluster)], "INPUT"),
        (["gs://in/a", "gs://out/a", "--model", "x4.safetensors", "--cluster", str(cluster)], "--model"),
        (["gs://in/a", "gs://out/a", "--model", "gs://m/x", "--cluster", str(cluster), "--batch-args=--bogus 2"],
         "unrecognized arguments: --bogus 2"),  # sr batch's own parser, here
        (["gs://in/a", "gs://out/a", "--model", "gs://m/x", "--cluster", str(old_ray)],
         "installs Ray 2.59.0 but this machine has Ray 2.60.0"),  # the job client must match the cluster
    ):
        done = sr(["cloud", "batch", *args, "--dry-run", "--out", str(tmp_path / "o")])
        assert done.returncode == 2 and named in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1


def test_batch_actors_get_the_cpus_of_the_cluster_shape(tmp_path, offline_env, sr):
    """The CPUs and encode threads of each GPU actor follow the cost table (generator and
    output format), within the workers' vCPUs per GPU less one."""
    from infra import raycluster

    # The table: RRDBNet's PNG needs ~2 cores beside a V100, the compact generator's many more.
    assert math.ceil(raycluster.encode_cores_per_gpu("rrdbnet", "png")) == 2
    assert raycluster.encode_cores_per_gpu("srvgg_compact", "png") > 8
    assert raycluster.encode_cores_per_gpu("rrdbnet", "jpeg") < raycluster.encode_cores_per_gpu("rrdbnet", "png")
    cases = [  # (ray-config shape, sr cloud batch options, --batch-args, actors, CPUs per actor)
        (["--gpus-per-worker", "2", "--cpus-per-gpu", "4", "--max-workers", "3"], [], "", "1,6", "2"),
        (["--gpus-per-worker", "4", "--cpus-per-gpu", "2"], [], "", "1,16", "1"),
        (["--cpus-per-gpu", "8"], ["--generator", "srvgg_compact"], "", "1,4", "7"),
        (["--cpus-per-gpu", "8"], ["--generator", "srvgg_compact"], "--format jpg ", "1,4", "7"),
        (["--cpus-per-gpu", "8"], [], "-f jpeg ", "1,4", "2"),
    ]
    for shape, options, batch_args, actors, cpus in cases:
        cluster = tmp_path / "cluster.yaml"
        assert sr(["cloud", "ray-config", "--project", "p", *shape, "-o", cluster]).returncode == 0
        config = yaml.safe_load(cluster.read_text())
        worker = config["available_node_types"]["gpu_worker"]["resources"]
        done = sr(["cloud", "batch", "gs://in/a", "gs://out/a", "--model", "gs://m/x", "--cluster", cluster, *options,
                   "--submission-id", "j", "--dry-run", "--out", tmp_path / "o",
                   f"--batch-args={batch_args}--encode-threads 9"])
        assert done.returncode == 0, done.stderr
        argv = shlex.split(next(line for line in done.stdout.splitlines() if line.startswith("  ray job submit")))
        entry = argv[argv.index("--") + 1:]
        assert entry[entry.index("--actors") + 1] == actors
        assert worker["CPU"] // worker["GPU"] == int(shape[shape.index("--cpus-per-gpu") + 1])
        assert entry[entry.index("--cpus-per-actor") + 1] == cpus == entry[entry.index("--encode-threads") + 1]
        assert entry[-2:] == ["--encode-threads", "9"]  # the user's choice comes last and wins


FAKE_RAY = """
import http.server, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([os.getpid(), *args]) + "\\n")
if args[0] == "get-head-ip":
    sys.exit(0 if os.path.exists(os.environ["FAKE_RAY_UP"]) else 1)
if args[0] == "up":
    open(os.environ["FAKE_RAY_UP"], "w").close()
elif args[0] == "dashboard":  # the SSH tunnel: the head's job server, here a stand-in on --port
    if os.environ.get("FAKE_RAY_TUNNEL_FAILS"):
        sys.exit("ssh: connect to host 34.56.78.90 port 22: Connection refused")
    version = os.environ.get("FAKE_RAY_CLUSTER_VERSION", "2.60.0")
    class JobServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"version": "4", "ray_version": version, "ray_commit": "c0ffee",
                               "session_name": "session_2026-12-04_10-00-00_000000_1"}).encode()
            self.send_response(200 if self.path == "/api/version" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), JobServer).serve_forever()
"""


class LocalRay:
    """Something on 127.0.0.1:8265 that answers like a local Ray's job server (or whatever
    already listens there): a job must never be submitted to it."""

    def __init__(self):
        import http.server
        import threading

        class JobServer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "local",
                                   "session_name": "session_local"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        try:
            self.server = http.server.HTTPServer(("127.0.0.1", 8265), JobServer)
        except OSError:  # a listener is there already: the same situation
            self.server = None
        else:
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(") ", 1)[1][0] != "Z"


def _ray_calls(log: Path) -> list[list]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    ray = fake_tool(tmp_path / "bin", "ray", FAKE_RAY)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "ray.log"))
    monkeypatch.setenv("FAKE_RAY_UP", str(tmp_path / "head-is-up"))
    (tmp_path / "ray.log").write_text("")
    local = LocalRay()
    yield ray
    local.close()


def test_batch_commands_sh_runs_as_written(tmp_path, offline_env, sr, fake_ray):
    """commands.sh with `ray` on PATH: `ray up` only when `ray get-head-ip` fails, the
    tunnel in the background on a free port (a local Ray holds 8265), the job submitted
    through it once it answers as the cluster's Ray, the logs followed, the tunnel closed."""
    cluster = tmp_path / "cluster.yaml"
    assert sr(["cloud", "ray-config", "--project", "p", "-o", cluster]).returncode == 0
    out = tmp_path / "job"
    assert sr(["cloud", "batch", "gs://in/a", "gs://out/a", "--model", "gs://m/x", "--cluster", cluster,
               "--submission-id", "job1", "--dry-run", "--out", out]).returncode == 0
    env = dict(os.environ, PATH=f"{fake_ray.parent}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "ray.log"
    for run in range(2):
        log.write_text("")
        done = subprocess.run(["bash", str(out / "commands.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        calls = _ray_calls(log)
        verbs = [c[1] if c[1] != "job" else f"job {c[2]}" for c in calls]
        # The first run starts the cluster; the second finds its head and skips `ray up`.
        assert verbs == (["get-head-ip", "up"] if run == 0 else ["get-head-ip"]) + [
            "dashboard", "job submit", "job logs"]
        tunnel = calls[verbs.index("dashboard")]
        port = tunnel[tunnel.index("--port") + 1]
        assert port != "8265" and tunnel[tunnel.index("--remote-port") + 1] == "8265"
        submit = calls[verbs.index("job submit")]
        assert submit[submit.index("--address") + 1] == f"http://127.0.0.1:{port}"
        assert submit[submit.index("--") + 1:][:2] == ["sr", "batch"]
        assert not _alive(tunnel[0])  # closed when the script ended

    # A tunnel that cannot be opened: nothing is submitted, not even to the local Ray on 8265.
    log.write_text("")
    done = subprocess.run(["bash", str(out / "commands.sh")], env=dict(env, FAKE_RAY_TUNNEL_FAILS="1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the tunnel to the head) exited" in done.stderr
    assert "job submit" not in " ".join(" ".join(map(str, c)) for c in _ray_calls(log))


def test_batch_submits_through_the_tunnel_only(tmp_path, offline_env, fake_ray, monkeypatch):
    """`sr cloud batch`'s own submission: through a tunnel on a free port, checked to be
    the cluster's Ray; a dead tunnel or another Ray version submits nothing."""
    from infra import raycluster
    from infra.raysubmit import submit_through_tunnel

    job = raycluster.BatchJob(input="gs://in/a", output="gs://out/a", model="gs://m/x",
                              cluster_yaml=str(tmp_path / "cluster.yaml"), submission_id="job2", project_dir=str(ROOT),
                              max_gpus=4, cpus_per_gpu=8)
    log = tmp_path / "ray.log"
    port = submit_through_tunnel(str(fake_ray), job, "2.60.0")
    calls = _ray_calls(log)
    assert [c[1] for c in calls] == ["dashboard", "job"] and port != 8265
    assert calls[1][calls[1].index("--address") + 1] == f"http://127.0.0.1:{port}"
    assert not _alive(calls[0][0])

    for variable, value, message in (("FAKE_RAY_TUNNEL_FAILS", "1", "Connection refused"),
                                     ("FAKE_RAY_CLUSTER_VERSION", "2.59.0", "answers as Ray 2.59.0, not the "
                                                                            "cluster's 2.60.0")):
        log.write_text("")
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=message):
            submit_through_tunnel(str(fake_ray), job, "2.60.0", wait_s=60)
        monkeypatch.delenv(variable)
        assert [c[1] for c in _ray_calls(log)] == ["dashboard"]  # nothing submitted
        assert not _alive(_ray_calls(log)[0][0])


# --- the image ------------------------------------------------------------------------------


def test_dockerfile_agrees_with_pyproject_and_the_cloud_pins():
    """Docker has no engine on these machines, so the image is not built here; what it
    installs is read back and compared with pyproject, infra/image.py and what CI runs."""
    from importlib.metadata import version

    import torch
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from infra import image

    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    # A plain OS base: the cu126 wheel brings CUDA's libraries, the host brings the driver.
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1)
    assert base == image.BASE_IMAGE and "cuda" not in base and "nvidia" not in base
    assert image.TORCH_CUDA == "cu126"
    # The V100 cliff: cu126, the last CUDA flavour with sm_70 kernels, ends after torch 2.14.
    pinned = tuple(int(p) for p in image.TORCH_VERSION.split(".")[:2])
    assert pinned <= image.TORCH_LAST_WITH_SM70 == (2, 14), image.TORCH_VERSION
    assert args == {"TORCH_VERSION": image.TORCH_VERSION, "TORCH_CUDA": image.TORCH_CUDA,
                    "RAY_VERSION": image.RAY_VERSION}
    assert re.search(r'image\.version="([^"]+)"', dockerfile).group(1) == pyproject["version"]
    python = re.search(r"python(3\.\d+) -m venv", dockerfile).group(1)
    assert python == image.PYTHON.removeprefix("python")
    assert SpecifierSet(pyproject["requires-python"]).contains(python)
    requirements = [Requirement(r) for r in pyproject["dependencies"]]
    requirements += [Requirement(r) for extra in ("train", "batch") for r in pyproject["optional-dependencies"][extra]]
    pins = {"torch": image.TORCH_VERSION, "ray": image.RAY_VERSION}
    for req in requirements:
        if req.name in pins:
            assert req.specifier.contains(pins[req.name]), (req, pins[req.name])
    # The cloud runs the versions the tests run here (a CPU build of the same torch).
    assert torch.__version__.split("+")[0] == image.TORCH_VERSION
    assert version("ray") == image.RAY_VERSION
    assert '".[train,batch]"' in dockerfile and "sm_70" in dockerfile


def test_ray_pin_on_the_submitting_side_equals_the_clusters(tmp_path, offline_env, sr):
    """Ray's job client and cluster launcher must run the cluster's Ray version: pyproject
    pins the submitting side to exactly the version the generated cluster installs."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray,) = [Requirement(r) for r in extras["batch"] if Requirement(r).name == "ray"]
    (spec,) = ray.specifier
    assert spec.operator == "==", ray
    cluster = tmp_path / "cluster.yaml"
    assert sr(["cloud", "ray-config", "--project", "p", "-o", cluster]).returncode == 0
    installs = set(re.findall(r"ray\[default\]==([0-9.]+)", cluster.read_text()))
    dockerfile = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M))
    assert installs == {spec.version} == {dockerfile["RAY_VERSION"]} == {version("ray")}


# --- TensorBoard ------------------------------------------------------------------------------


def _serve_and_read(target: str, env: dict) -> dict:
    """Start `sr tensorboard TARGET` on a free loopback port, read its runs and one series
    from the printed URL, stop it."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "sr"), "tensorboard", target, "--port", str(port), "--reload-interval", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1).rstrip("/")
        assert f"127.0.0.1:{port}" in url, line
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
        listed: list[str] = []

        def both_runs_listed() -> bool:
            listed[:] = json.loads(opener.open(url + "/data/runs", timeout=60).read())
            return len(listed) == 2

        wait_for(both_runs_listed, "both runs listed by TensorBoard", proc=proc, interval=0.5)
        series = {run: [row[2] for row in json.loads(opener.open(
            f"{url}/data/plugin/scalars/scalars?run={run}&tag=train/loss_g", timeout=60).read())] for run in listed}
        return series
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tensorboard_serves_local_and_gs_runs(tmp_path, offline_env, gcs_emulator):
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    for name, slope in (("psnr", 1.0), ("gan", 2.0)):
        with SummaryWriter(str(runs / name / "tb")) as writer:
            for step in range(5):
                writer.add_scalar("train/loss_g", slope * step, step)
    expected = {"gan/tb": [0.0, 2.0, 4.0, 6.0, 8.0], "psnr/tb": [0.0, 1.0, 2.0, 3.0, 4.0]}
    assert _serve_and_read(str(runs), offline_env) == expected
    # The same event files in a bucket (the emulator on loopback; google-auth's metadata
    # server pointed at a closed loopback port, so nothing else can be asked).
    bucket = gcs_emulator.make_bucket()
    gcs_emulator.fs().put(str(runs), f"{bucket[5:]}/runs", recursive=True)
    env = dict(os.environ, GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9", NO_GCE_CHECK="True")
    assert _serve_and_read(f"{bucket}/runs", env) == expected


def test_tensorboard_target_resolution(tmp_path, gcs_emulator):
    from infra.tensorboard import resolve_logdir

    run = tmp_path / "runs" / "r1"
    (run / "tb").mkdir(parents=True)
    assert resolve_logdir(str(run)) == str(run)
    output = tmp_path / "out"
    (output / "_sr_batch" / "20261202-0100").mkdir(parents=True)
    (output / "photo.png").write_bytes(b"x")
    assert resolve_logdir(str(output)) == str(output / "_sr_batch")  # not the images
    with pytest.raises(FileNotFoundError):
        resolve_logdir(str(tmp_path / "nothing"))
    with pytest.raises(ValueError):
        resolve_logdir(str(output / "photo.png"))
    bucket = gcs_emulator.make_bucket()
    fs = gcs_emulator.fs()
    fs.pipe(f"{bucket[5:]}/out/_sr_batch/run1/summary.json", b"{}")
    fs.pipe(f"{bucket[5:]}/runs/r1/tb/events.out.tfevents.1", b"")
    assert resolve_logdir(f"{bucket}/out") == f"{bucket}/out/_sr_batch"
    assert resolve_logdir(f"{bucket}/runs") == f"{bucket}/runs"



def test_help_lists_cloud_commands_and_imports_no_engine():
    code = ("import sys\nfrom sr_cli.main import build_parser\ntext = build_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'ray', 'sky', 'tensorboard', 'yaml') if m in sys.modules))\n"
            "print(text)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    heavy, _, text = done.stdout.partition("\n")
    assert heavy == "[]" and "cloud" in text and "tensorboard" in text


def test_ray_config_project_defaults_to_gclouds(tmp_path, offline_env, sr):
    done = sr(["cloud", "ray-config"])
    assert done.returncode == 2 and "gcloud config set project" in done.stderr
    gcloud = Path(os.environ["CLOUDSDK_CONFIG"])
    (gcloud / "configurations").mkdir(parents=True)
    (gcloud / "active_config").write_text("work")
    (gcloud / "configurations" / "config_work").write_text("[core]\nproject = from-gcloud\naccount = a@b.c\n")
    done = sr(["cloud", "ray-config", "--gpu", "nvidia-tesla-v100", "--gpus-per-worker", "2", "--max-workers", "2"])
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["provider"]["project_id"] == "from-gcloud"


# --- the documentation ------------------------------------------------------------------------


def _doc_commands() -> list[str]:
    text = (ROOT / "docs" / "CLOUD.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("sr "):
                commands.append(line)
    return commands


def test_every_sr_command_in_the_cloud_doc_runs_as_a_dry_run(tmp_path, offline_env, sr, monkeypatch):
    from sr_cli.main import build_parser

    commands = _doc_commands()
    cloud = [c for c in commands if c.startswith("sr cloud ")]
    assert len(cloud) >= 8 and {c.split()[2] for c in cloud} >= {
        "train", "status", "logs", "stop", "ray-config", "batch", "doctor"}
    parser = build_parser()
    monkeypatch.chdir(tmp_path)  # the doc's relative files (cluster.yaml) land here
    # The doc's `gcloud config set project my-project`, as gcloud writes it.
    gcloud = Path(os.environ["CLOUDSDK_CONFIG"])
    (gcloud / "configurations").mkdir(parents=True)
    (gcloud / "active_config").write_text("default")
    (gcloud / "configurations" / "config_default").write_text("[core]\nproject = my-project\n")
    for i, command in enumerate(commands):
        command, _, redirect = command.partition(">")
        argv = shlex.split(command)
        parser.parse_args(argv[1:])  # every sr line of the doc is a valid invocation
        if argv[1] != "cloud":
            continue
        if argv[2] == "doctor":  # what it would check, with no credentials needed
            argv[3:3] = ["--dry-run"]
        elif argv[2] != "ray-config":  # it only prints; the others get --dry-run
            argv[3:3] = ["--dry-run", "--out", str(tmp_path / f"out{i}")]
        done = sr(argv[1:])
        assert done.returncode == 0, (command, done.stderr)
        if redirect:
            Path(redirect.strip()).write_text(done.stdout)


# --- the rehearsal: the generated run script on two "nodes" of this host ----------------------


def _start_node(run_sh: Path, rank: int, port: int, home: Path, ssd: Path, log: Path) -> subprocess.Popen:
    """One "VM": the run script with the variables SkyPilot sets on node ``rank`` of 2
    (rank 0's address first in SKYPILOT_NODE_IPS, here loopback), one "GPU" per node
    (CPU and gloo here), its own HOME (with the config file mount) and "local SSD"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "ACCELERATE_", "RANK",
                                                                        "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.1",
               SKYPILOT_NUM_GPUS_PER_NODE="1", SR_VENV=sys.prefix, SR_LOCAL_DISK=str(ssd),
               SR_MAIN_PROCESS_PORT=str(port), HOME=str(home), OMP_NUM_THREADS="1")
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", str(run_sh)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the node's whole process tree (the launcher's workers may have their own
    process groups), as a vanished VM would take them all."""
    import psutil

    try:
        tree = psutil.Process(proc.pid)
        victims = [tree, *tree.children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


def test_rehearsal_two_nodes_identical_weights_then_kill_and_resume(tmp_path, gcs_emulator, offline_env, sr):
    from jobs import checkpoint as ckpt
    from jobs.prepare import PrepareSettings, prepare

    bucket = gcs_emulator.make_bucket("rehearsal")
    prepare(str(ROOT / "assets" / "images"), f"{bucket}/shards",
            PrepareSettings(size=96, step=96, images_per_shard=1), progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  max_steps: 24\n  checkpoint_every: 4\n  log_every: 4\n  progress: false\n"
                      "data:\n  num_workers: 0\n")
    gen = tmp_path / "gen"
    done = sr(["cloud", "train", "--preset", "tiny", str(config), f"data.train_shards={bucket}/shards",
               "--name", "rehearsal", "--bucket", bucket, "--nodes", "2", "--gpus", "V100:1",
               "--dry-run", "--out", str(gen)])
    assert done.returncode == 0, done.stderr
    run_sh = gen / "run.sh"
    run_dir = f"{bucket}/runs/rehearsal"

    homes, ssds, logs = [], [], []
    for rank in range(2):
        home = tmp_path / f"node{rank}" / "home"
        (home / "sr-job").mkdir(parents=True)
        (home / "sr-job" / "config.yaml").write_text(config.read_text())  # SkyPilot's file mount
        homes.append(home)
        ssds.append(tmp_path / f"node{rank}" / "ssd")
        ssds[-1].mkdir()
        logs.append(tmp_path / f"node{rank}.log")

    def complete_steps():
        gcs_emulator.fs().clear_instance_cache()  # gcsfs caches listings
        return ckpt.complete_steps(run_dir)

    def digests(step):
        """Each rank's SHA-256 of its networks, saved in its part of the checkpoint."""
        folder = ckpt.step_dir(run_dir, step)
        return [ckpt.load_torch(f"{folder}/rank_{r}.pt")["digest"] for r in range(2)]

    # First launch; once a checkpoint is complete, node 1 vanishes (SIGKILL, as a preempted
    # VM without notice) and node 0 is stopped too, as SkyPilot tears down the cluster.
    port = free_port()
    nodes = [_start_node(run_sh, r, port, homes[r], ssds[r], logs[r]) for r in range(2)]
    try:
        def a_checkpoint_complete() -> bool:
            assert all(n.poll() is None for n in nodes), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            return bool(complete_steps())

        wait_for(a_checkpoint_complete, "a complete checkpoint", interval=0.2)
        _kill(nodes[1])
    finally:
        for n in nodes:
            _kill(n)
    first = complete_steps()
    assert first and first[-1] < 24, first
    a, b = digests(first[0])
    assert a == b  # both ranks held identical weights when they checkpointed

    # Both nodes relaunched with the same script: they resume from the newest checkpoint.
    port = free_port()
    nodes = [_start_node(run_sh, r, port, homes[r], ssds[r], logs[r]) for r in range(2)]
    try:
        for rank, node in enumerate(nodes):
            assert node.wait(timeout=HANG_TIMEOUT) == 0, logs[rank].read_text()[-4000:]
    finally:
        for n in nodes:
            _kill(n)
    log0 = logs[0].read_text()
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log0)
    assert resumed and int(resumed[-1][1]) == first[-1], log0[-3000:]
    assert complete_steps()[-1] == 24
    a, b = digests(24)
    assert a == b
    # Shards were read from the bucket into each node's "local SSD" cache.
    for ssd in ssds:
        assert any(p.is_file() for p in (ssd / "sr-shards").rglob("*")), list(ssd.rglob("*"))
