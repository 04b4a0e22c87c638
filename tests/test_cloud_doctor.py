"""`sr cloud doctor` against recorded Google Cloud API responses, served over real HTTP
on 127.0.0.1 (tests/gcpapi.py): credentials, token refresh, the Docker registry's token
protocol and every response are parsed as they would be from Google. A ready project
passes; a new project's gaps (quotas, an API off, a missing service account, a role not
granted, a bucket in another region, an image never pushed) each fail with their fix;
without credentials it says what it would check and stops; unreachable APIs exit 75."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cloudenv import offline_env, sr  # noqa: F401 (fixtures)
from gcpapi import RecordedApis

READY = Path(__file__).parent / "fixtures" / "gcp" / "ready"
IMAGE = "us-central1-docker.pkg.dev/my-project/sr/sr-cloud:0.1.0"
SHAPE = ["--project", "my-project", "--region", "us-central1", "--bucket", "gs://my-sr-bucket",
         "--nodes", "2", "--gpus", "V100:4", "--spot", "--image", f"docker:{IMAGE}"]


@pytest.fixture
def cluster(tmp_path, sr, offline_env):
    path = tmp_path / "cluster.yaml"
    done = sr(["cloud", "ray-config", "--project", "my-project", "--max-workers", "8", "--spot",
               "--image", IMAGE, "-o", path])
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture
def project(tmp_path):
    """A copy of the ready project's recorded responses, for a test to break."""
    folder = tmp_path / "gcp"
    shutil.copytree(READY, folder)
    return folder


def edit(folder: Path, relative: str, change) -> None:
    file = folder / f"{relative}.json"
    data = json.loads(file.read_text())
    data = change(data) or data
    file.write_text(json.dumps(data))


def set_quota(folder: Path, relative: str, metric: str, limit: float) -> None:
    def change(data):
        (quota,) = [q for q in data["quotas"] if q["metric"] == metric]
        quota["limit"] = limit
    edit(folder, relative, change)


def doctor(sr, monkeypatch, apis: RecordedApis, tmp_path, args):
    monkeypatch.setenv("SR_GOOGLE_API_ROOT", apis.root)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(apis.credentials_file(tmp_path / "adc.json")))
    return sr(["cloud", "doctor", *args])


def rows(stdout: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"ok": [], "FAIL": [], "warn": []}
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        status = line.split(" ", 1)[0]
        if status in found:
            fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("      fix: ") else ""
            found[status].append(line[6:] + (f" || {fix}" if fix else ""))
    return found


def test_a_ready_project_passes(tmp_path, offline_env, sr, monkeypatch, cluster):
    with RecordedApis(READY) as apis:
        done = doctor(sr, monkeypatch, apis, tmp_path, [*SHAPE, "--cluster", cluster])
    assert done.returncode == 0, done.stdout + done.stderr
    found = rows(done.stdout)
    assert not found["FAIL"] and not found["warn"], found
    # What the shape needs, summed over training and the batch cluster, against the
    # recorded limits: spot VMs use the PREEMPTIBLE_ quotas this project has.
    ok = "\n".join(found["ok"])
    for line in (
        "quota PREEMPTIBLE_CPUS (us-central1): need 128, limit 200",        # 2 x n1-highmem-32 + 8 x n1-standard-8
        "quota CPUS (us-central1): need 8, limit 96",                        # the Ray head, on demand
        "quota N2_CPUS (us-central1): need 4",                               # the jobs controller
        "quota PREEMPTIBLE_NVIDIA_V100_GPUS (us-central1): need 16, limit 16",
        "quota PREEMPTIBLE_LOCAL_SSD_GB (us-central1): need 750",
        "quota IN_USE_ADDRESSES (us-central1): need 12",                     # 2 + controller + head + 8
        "quota CPUS_ALL_REGIONS (all regions): need 140",                    # 64 + 4 + 72
        "quota GPUS_ALL_REGIONS (all regions): need 16, limit 16",
        "quota DISKS_TOTAL_GB (us-central1): need 1800",
        "quota SSD_TOTAL_GB (us-central1): need 250",
        "nvidia-tesla-v100 offered in us-central1-a",
        "API artifactregistry.googleapis.com enabled",
        "bucket gs://my-sr-bucket is in us-central1, with the VMs",
        f"image {IMAGE} can be pulled",
        "skypilot-v1@my-project.iam.gserviceaccount.com may pull from us-central1-docker.pkg.dev/my-project/sr",
        "ray-autoscaler-sa-v1@my-project.iam.gserviceaccount.com (the Ray head and GPU workers) has "
        "roles/storage.objectAdmin",
        "you have iam.serviceAccounts.create",
    ):
        assert line in ok, (line, ok)
    # The real paths ran: a token from the token endpoint, bearer calls, and the
    # registry's own token dance (challenge, basic login, bearer manifest).
    paths = [(m, p, a) for m, p, a in apis.requests]
    assert ("POST", "/oauth2.googleapis.com/token", "") in paths
    assert all(a == "Bearer" for m, p, a in paths if "googleapis.com" in p and "oauth2" not in p)
    manifest = f"/us-central1-docker.pkg.dev/v2/my-project/sr/sr-cloud/manifests/0.1.0"
    assert [a for m, p, a in paths if p in (manifest, "/us-central1-docker.pkg.dev/v2/token")] == [
        "", "Basic", "Bearer"]


def test_a_new_project_fails_with_a_fix_for_each_gap(tmp_path, offline_env, sr, monkeypatch, cluster, project):
    region = "compute.googleapis.com/compute/v1/projects/my-project/regions/us-central1"
    # A new project's quotas: no preemptible quota, 24 vCPUs, no GPUs in all regions.
    set_quota(project, region, "PREEMPTIBLE_CPUS", 0)
    set_quota(project, region, "CPUS", 24)
    set_quota(project, "compute.googleapis.com/compute/v1/projects/my-project", "GPUS_ALL_REGIONS", 0)
    set_quota(project, region, "IN_USE_ADDRESSES", 8)
    # Artifact Registry's API off; SkyPilot's account never created; Ray's not allowed to pull.
    edit(project, "serviceusage.googleapis.com/v1/projects/my-project/services",
         lambda d: {"services": [s for s in d["services"] if s["config"]["name"] != "artifactregistry.googleapis.com"]})
    (project / "iam.googleapis.com/v1/projects/my-project/serviceAccounts/"
               "skypilot-v1@my-project.iam.gserviceaccount.com.json").unlink()
    edit(project, "artifactregistry.googleapis.com/v1/projects/my-project/locations/us-central1/repositories/"
                  "sr:getIamPolicy", lambda d: {"version": 1, "etag": "ACAB"})
    # The caller cannot create service accounts; the bucket is in Europe.
    edit(project, "cloudresourcemanager.googleapis.com/v1/projects/my-project:testIamPermissions",
         lambda d: {"permissions": ["compute.instances.create", "iam.serviceAccounts.actAs"]})
    edit(project, "storage.googleapis.com/storage/v1/b/my-sr-bucket", lambda d: d.update(location="EUROPE-WEST4"))
    with RecordedApis(project) as apis:
        done = doctor(sr, monkeypatch, apis, tmp_path, [*SHAPE, "--cluster", cluster])
    assert done.returncode == 1, done.stdout + done.stderr
    failed = "\n".join(rows(done.stdout)["FAIL"])
    for line in (
        # 8 (head) + 64 (spot training) + 64 (spot workers): no preemptible quota, so all on CPUS.
        "quota CPUS (us-central1): need 136 (",
        "limit 24, in use 0 || fix: request CPUS >= 136 in us-central1 at "
        "https://console.cloud.google.com/iam-admin/quotas?project=my-project",
        "quota GPUS_ALL_REGIONS (all regions): need 16",
        "quota IN_USE_ADDRESSES (us-central1): need 12",
        "API artifactregistry.googleapis.com is not enabled: Artifact Registry (the image) || fix: gcloud services "
        "enable artifactregistry.googleapis.com --project my-project",
        "service account skypilot-v1@my-project.iam.gserviceaccount.com (SkyPilot's VMs) does not exist yet, so it "
        "cannot have the Artifact Registry role it needs to pull the image (create it now; SkyPilot then adopts it) "
        "|| fix: gcloud iam service-accounts create skypilot-v1 --project my-project && gcloud artifacts "
        "repositories add-iam-policy-binding sr --project my-project --location us-central1 "
        "--member=serviceAccount:skypilot-v1@my-project.iam.gserviceaccount.com --role=roles/artifactregistry.reader",
        f"ray-autoscaler-sa-v1@my-project.iam.gserviceaccount.com (the Ray head and GPU workers) "
        f"may not pull {IMAGE} (no Artifact Registry read role) || fix: gcloud artifacts repositories "
        "add-iam-policy-binding sr --project my-project --location us-central1 "
        "--member=serviceAccount:ray-autoscaler-sa-v1@my-project.iam.gserviceaccount.com "
        "--role=roles/artifactregistry.reader",
        "you lack iam.serviceAccounts.create, which this setup needs || fix: ask a project Owner for roles/owner, "
        "or roles/iam.serviceAccountAdmin + roles/resourcemanager.projectIamAdmin",
        "you lack resourcemanager.projects.setIamPolicy, which this setup needs",
        "bucket gs://my-sr-bucket is in europe-west4 but the VMs run in us-central1",
    ):
        assert line in failed, (line, failed)
    assert "PREEMPTIBLE_CPUS" not in failed
    found = rows(done.stdout)
    summary = done.stdout.rstrip().splitlines()[-1]
    assert summary == f"{sum(map(len, found.values()))} checks: {len(found['FAIL'])} failed, 0 warnings"


def test_an_image_never_pushed_a_zone_without_gpus_and_other_gaps(tmp_path, offline_env, sr, monkeypatch, project):
    (project / "us-central1-docker.pkg.dev/v2/my-project/sr/sr-cloud/manifests/0.1.0.json").unlink()
    edit(project, "storage.googleapis.com/storage/v1/b/my-sr-bucket",
         lambda d: d.update(location="US", locationType="multi-region"))
    # GPU workers that run as the user's own account, which was never created.
    cluster = tmp_path / "workers.yaml"
    assert sr(["cloud", "ray-config", "--project", "my-project", "--service-account",
               "sr-workers@my-project.iam.gserviceaccount.com", "-o", cluster]).returncode == 0

    def no_v100_in_us_central1(data):
        for key in list(data["items"]):
            if key.startswith("zones/us-central1-"):
                data["items"][key] = {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "none",
                                                  "data": [{"key": "scope", "value": key}]}}
    edit(project, "compute.googleapis.com/compute/v1/projects/my-project/aggregated/acceleratorTypes",
         no_v100_in_us_central1)
    with RecordedApis(project) as apis:
        done = doctor(sr, monkeypatch, apis, tmp_path, [*SHAPE, "--cluster", cluster])
    assert done.returncode == 1, done.stdout + done.stderr
    found = rows(done.stdout)
    failed = "\n".join(found["FAIL"])
    assert found["warn"] == ["bucket gs://my-sr-bucket is multi-region US; the VMs run in us-central1 || fix: a "
                             "regional bucket in the VMs' region reads fastest"]
    assert ("service account sr-workers@my-project.iam.gserviceaccount.com (the Ray GPU workers) does not exist || "
            "fix: gcloud iam service-accounts create sr-workers --project my-project") in failed
    assert (f'image {IMAGE} does not exist (Failed to fetch "0.1.0") || fix: gcloud auth configure-docker '
            "us-central1-docker.pkg.dev && docker build") in failed
    assert ("nvidia-tesla-v100 is not offered in us-central1 || fix: choose a region/zone that has it: "
            "asia-east1-c, europe-west4-a") in failed


def test_without_credentials_it_says_what_it_would_check(tmp_path, offline_env, sr, cluster):
    done = sr(["cloud", "doctor", *SHAPE, "--cluster", cluster])
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "no Google Cloud credentials" in line and "gcloud auth application-default login" in line
    out = done.stdout
    assert "2 x n1-highmem-32 + V100:4 (spot)" in out and "n2-standard-4" in out
    assert "quota CPUS (or PREEMPTIBLE_CPUS) in us-central1: 64 for training: 2 x n1-highmem-32" in out
    assert "quota CPUS_ALL_REGIONS in all regions: 72 for batch: head and workers" in out
    assert "quota LOCAL_SSD_TOTAL_GB (or PREEMPTIBLE_LOCAL_SSD_GB) in us-central1: 750" in out
    assert "artifactregistry.googleapis.com" in out and f"image {IMAGE}" in out
    dry = sr(["cloud", "doctor", *SHAPE, "--dry-run"])
    assert dry.returncode == 0 and "would check:" in dry.stdout and not dry.stderr


def test_unreachable_apis_exit_75(tmp_path, offline_env, sr, monkeypatch, project):
    with RecordedApis(project) as apis:
        adc = apis.credentials_file(tmp_path / "adc.json")
        root = apis.root
    # The server is gone: its port refuses connections.
    monkeypatch.setenv("SR_GOOGLE_API_ROOT", root)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    done = sr(["cloud", "doctor", *SHAPE])
    assert done.returncode == 75, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cannot reach serviceusage.googleapis.com (no connection)" in line and "rerun" in line


def test_doctor_refuses_bad_arguments(tmp_path, offline_env, sr, cluster):
    for args, named in ((["--project", "p", "--gpus", "A100:8"], "A100"),
                        (["--project", "p", "--bucket", "my-bucket"], "--bucket"),
                        (["--project", "p", "--no-train"], "nothing to check"),
                        (["--project", "p", "--region", "us-west1", "--zone", "us-central1-a"], "--zone")):
        done = sr(["cloud", "doctor", *args, "--dry-run"])
        assert done.returncode == 2 and named in done.stderr, (args, done.stderr)
    config = yaml.safe_load(cluster.read_text())
    assert config["provider"]["project_id"] == "my-project"
    done = sr(["cloud", "doctor", "--no-train", "--cluster", cluster, "--dry-run"])  # project from the config
    assert done.returncode == 0 and "project my-project" in done.stdout, done.stderr
