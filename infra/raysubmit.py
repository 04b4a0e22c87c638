"""Batch upscaling on a Ray cluster from this machine: ``sr cloud ray-config`` (the
cluster-launcher YAML) and ``sr cloud batch`` (check the job here, start the cluster
unless it is up, submit ``sr batch`` through a tunnel to the head's job server)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import time

from infra import raycluster, shell
from infra.credentials import gcloud_project, require_gcp
from infra.outfolder import dump_yaml, out_dir, print_plan, project_dir, run_tool, write
from sr_core import storage
from sr_core.net import free_port


def write_ray_config(output: str = "-", project_id: str = "", source_image: str | None = None, **spec) -> None:
    """``sr cloud ray-config``: the cluster-launcher YAML of ``ClusterSpec(**spec)`` to
    ``output`` (``-``: standard output); the project defaults to gcloud's."""
    spec = raycluster.ClusterSpec(project_id=project_id or gcloud_project(),
                                  source_image=source_image or raycluster.DEFAULT_SOURCE_IMAGE, **spec)
    text = "# Ray cluster launcher config written by `sr cloud ray-config`: ray up / ray down use it.\n"
    text += dump_yaml(raycluster.cluster_config(spec, project_dir()))
    if output == "-":
        sys.stdout.write(text)
    else:
        write(output, text)
        print(f"wrote {output}", file=sys.stderr)


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


def check_remote(url: str, what: str) -> None:
    if storage.is_local(url):
        raise ValueError(f"{what} {url!r}: the cluster cannot read this machine's files; use a bucket URL (gs://...)")


def check_batch_arguments(entrypoint: list[str], sr_parser: argparse.ArgumentParser) -> None:
    """Parse the job's ``sr batch ...`` here with the ``sr`` parser itself, so a wrong option
    fails now, in one line, rather than on the cluster."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            sr_parser.parse_args(entrypoint[1:])
    except SystemExit:
        last = errors.getvalue().strip().splitlines()[-1:] or ["invalid arguments"]
        raise ValueError(f"--batch-args: {last[0]}") from None


def batch_format(batch_args: str) -> str:
    """The output format that ``--batch-args`` asks ``sr batch`` for (``-f`` / ``--format``)."""
    tokens, fmt = shlex.split(batch_args), "png"
    for i, token in enumerate(tokens):
        if token in ("-f", "--format") and i + 1 < len(tokens):
            fmt = tokens[i + 1]
        elif token.startswith("--format="):
            fmt = token.split("=", 1)[1]
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower())
    return fmt if fmt in ("png", "jpeg", "webp") else "png"  # sr batch's parser refuses the others


def submit_batch(input: str, output: str, model: str, cluster_path: str, sr_parser: argparse.ArgumentParser,
                 batch_args: str = "", submission_id: str = "", generator: str = "rrdbnet", out: str | None = None,
                 dry_run: bool = False) -> int:
    """``sr cloud batch``: check the job here (bucket URLs, CLUSTER.yaml, Ray's version, the
    ``sr batch`` options with ``sr_parser``, the ``sr`` command's own parser), write
    runtime_env.json and commands.sh, print the plan, and (without ``dry_run``) start the
    cluster unless it is up and submit through a tunnel to its job server."""
    check_remote(input, "INPUT")
    check_remote(output, "OUTPUT")
    check_remote(model, "--model")
    cluster = load_cluster_config(cluster_path)
    cluster_ray = check_ray_version(cluster, cluster_path)
    submission_id = shell.check_id(submission_id or time.strftime("sr-batch-%Y%m%d-%H%M%S", time.gmtime()),
                                   "--submission-id")
    job = raycluster.BatchJob(
        input=input, output=output, model=model, cluster_yaml=cluster_path,
        submission_id=submission_id, batch_args=tuple(shlex.split(batch_args)), project_dir=project_dir(),
        max_gpus=raycluster.max_gpus(cluster), cpus_per_gpu=raycluster.cpus_per_gpu(cluster),
        generator=generator, output_format=batch_format(batch_args),
    )
    check_batch_arguments(raycluster.batch_entrypoint(job), sr_parser)
    out = out_dir(out, submission_id)
    write(os.path.join(out, "runtime_env.json"), json.dumps(raycluster.runtime_env(job), indent=2) + "\n")
    notes = [f"cluster {cluster['cluster_name']}: `ray up` runs only when `ray get-head-ip` finds no head"]
    write(os.path.join(out, "commands.sh"), raycluster.commands_script(job, cluster_ray, notes), executable=True)
    print(f"cluster: {cluster_path} ({cluster['cluster_name']}, Ray {cluster_ray or 'version not stated'}); "
          f"runtime env: {os.path.join(out, 'runtime_env.json')}")
    print(f"images: {job.output}/<same relative paths>; metrics.parquet, failures.parquet, summary.json and "
          f"TensorBoard events: {job.output.rstrip('/')}/_sr_batch/{submission_id}/ (sr tensorboard {job.output})")
    print("PORT: a free local port, chosen when the tunnel to the head's job server starts")
    print_plan(out, raycluster.submit_commands(job, "PORT"), dry_run)
    if dry_run:
        return 0
    ray = require_gcp("ray")
    get_ip, up, *_ = raycluster.submit_commands(job, 0)
    if run_tool(ray, get_ip, capture=True).returncode != 0:
        if run_tool(ray, up).returncode != 0:
            raise ValueError(f"`ray up {cluster_path}` failed; its output is above")
    port = submit_through_tunnel(ray, job, cluster_ray)
    logs = raycluster.submit_commands(job, port)[-1]
    print(f"submitted {submission_id}; follow it with `{shell.line(logs)}` while "
          f"`ray dashboard --port {port} {cluster_path}` runs in another terminal")
    return 0


def check_ray_version(cluster: dict, path: str) -> str | None:
    """The cluster's Ray version; ValueError when this machine's Ray differs (Ray's job
    client and cluster launcher must match the cluster)."""
    from importlib.metadata import PackageNotFoundError, version


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
        if run_tool(ray, submit).returncode != 0:
            raise ValueError("`ray job submit` failed; its output is above")
    finally:
        tunnel.terminate()
        try:
            tunnel.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tunnel.kill()
            tunnel.wait()
    return port
