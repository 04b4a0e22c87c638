"""``sr cloud doctor`` from its arguments: the plan (what the training shape, the batch
cluster, the bucket and the images need), then the checks, printed with their fixes."""

from __future__ import annotations

import os
import sys

from infra import image, shell, skypilot
from infra.credentials import gcloud_project, gcp_credentials
from infra.doctor import plan as plan_module
from infra.doctor.api import Api, load_credentials
from infra.doctor.checks import run_checks
from infra.raysubmit import load_cluster_config


def doctor_plan(project: str = "", region: str = "", zone: str = "", bucket: str = "", train: bool = True,
                nodes: int = 1, gpus: str = "V100:1", spot: bool = False, disk_size: int = 100,
                local_ssd: bool = True, cluster_path: str = "", image_ref: str = "") -> plan_module.Plan:
    """What `sr cloud doctor` checks: the training shape (unless not ``train``), the
    cluster of CLUSTER.yaml ``cluster_path``, the bucket and the images."""
    cluster = load_cluster_config(cluster_path) if cluster_path else None
    if cluster is not None and cluster.get("provider", {}).get("type") != "gcp":
        raise ValueError(f"{cluster_path}: not a Google Cloud cluster config (provider.type is not gcp)")
    project = project or (cluster or {}).get("provider", {}).get("project_id") or gcloud_project()
    if not project:
        raise ValueError("no GCP project: pass --project or run `gcloud config set project PROJECT`")
    region = region or (cluster["provider"]["region"] if cluster else "us-central1")
    if zone and not zone.startswith(region + "-"):
        raise ValueError(f"--zone {zone} is not in --region {region}")
    if bucket:
        shell.check_bucket(bucket)
    job = None
    if train:
        job = skypilot.TrainJob(name="doctor", bucket=bucket or "gs://unchecked", nodes=nodes, gpus=gpus, spot=spot,
                                region=region, zone=zone, disk_size=disk_size, local_ssd=local_ssd,
                                image_id=image_ref)
        skypilot.check_job(job)
        kind, count = job.accelerator
        skypilot.host_machine_type(kind, count)
        if kind.upper() not in plan_module.GPU_TYPES:
            raise ValueError(f"--gpus {gpus}: sr cloud doctor knows {', '.join(plan_module.GPU_TYPES)}")
    elif not cluster:
        raise ValueError("--no-train without --cluster: nothing to check")
    images = []
    if job and image.docker_image(image_ref):
        images.append(image.docker_image(image_ref))
    cluster_image = (cluster or {}).get("docker", {}).get("image", "")
    if cluster_image and cluster_image not in images:
        images.append(cluster_image)
    plan = plan_module.Plan(project=project, region=region, bucket=bucket, train=job, cluster=cluster,
                            cluster_path=cluster_path, images=images)
    # These reach API URLs and the printed fix commands.
    shell.check_match(shell.PROJECT, plan.project, "project", "my-project-123")
    shell.check_match(shell.LOCATION, plan.region, "region", "us-central1")
    if cluster:
        shell.check_match(shell.LOCATION, str(cluster["provider"].get("availability_zone", "")),
                          f"{cluster_path}: provider.availability_zone", "us-central1-a")
    for email in plan.service_accounts():
        shell.check_match(shell.EMAIL, email, "service account", "sr-workers@my-project.iam.gserviceaccount.com")
    for ref in images:
        image.split_image(ref)
    return plan


def check_project(dry_run: bool = False, **asked) -> int:
    """``sr cloud doctor``: print the plan of ``doctor_plan(**asked)``, then each check
    with its fix; exit code 1 when one failed."""
    plan = doctor_plan(**asked)
    print("sr cloud doctor: " + "\n  ".join(plan_module.describe(plan)))
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    credentials = gcp_credentials()
    if dry_run or credentials is None:
        print("would check:" if dry_run else "would check, with credentials:")
        for line in plan_module.would_check(plan):
            print("  " + line)
        sys.stdout.flush()
        if dry_run:
            return 0
        if key:
            raise ValueError(f"GOOGLE_APPLICATION_CREDENTIALS={key}: no such file; nothing was checked")
        raise ValueError("no Google Cloud credentials: run `gcloud auth application-default login` (or set "
                         "GOOGLE_APPLICATION_CREDENTIALS to a key file); nothing was checked")
    api = Api(load_credentials(credentials))
    checks = run_checks(api, plan)
    for check in checks:
        print(f"{check.status:<5} {check.what}")
        if check.fix and check.status != "ok":
            print(f"      fix: {check.fix}")
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print(f"{len(checks)} checks: {failed} failed, {warned} warnings"
          + ("" if failed else "; nothing found that would stop a launch"))
    return 1 if failed else 0
