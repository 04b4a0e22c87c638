"""``sr cloud doctor``: check a Google Cloud project against what the cloud path needs,
before anything is launched.

It reads, with the user's application-default credentials, the same Google APIs the
engines use, and compares: the APIs enabled (Service Usage), the quotas against the VMs
SkyPilot and Ray's cluster launcher would create for the requested shape (Compute
Engine: regional and project quotas, GPUs offered in the zones), the caller's rights to
create service accounts and grant roles (Resource Manager's testIamPermissions), the
service accounts the VMs run as and their roles (IAM, the project's and the bucket's
IAM policies), the bucket's location against the VMs' region (Cloud Storage), and that
the image can be pulled (Artifact Registry and the registry's own Docker API).

Every request goes to ``https://HOST/PATH``; with ``SR_GOOGLE_API_ROOT=http://H:P`` set
it goes to ``http://H:P/HOST/PATH`` instead (the tests serve recorded API responses
there). Nothing is changed in the project: the checks only read.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.parse
from dataclasses import dataclass, field

from infra import image, raycluster, skypilot
from sr_core.errors import short_reason

API_ROOT_VARIABLE = "SR_GOOGLE_API_ROOT"
"""Overrides ``https://`` for every Google API host (a recorded-API server in tests)."""

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]

REQUIRED_APIS = {
    "compute.googleapis.com": "Compute Engine (the VMs)",
    "storage.googleapis.com": "Cloud Storage (data, runs, outputs)",
    "iam.googleapis.com": "IAM (the VMs' service accounts)",
    "cloudresourcemanager.googleapis.com": "Resource Manager (the project's IAM policy)",
}
"""The APIs SkyPilot's `sky check gcp` and Ray's GCP provider call."""

REGISTRY_API = "artifactregistry.googleapis.com"

GPU_TYPES = {
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "T4": "nvidia-tesla-t4",
}
"""SkyPilot's accelerator names and GCP's accelerator types (N1 hosts)."""

STORAGE_ROLES = {"roles/storage.admin", "roles/storage.objectAdmin", "roles/storage.objectUser",
                 "roles/owner", "roles/editor"}
"""Roles that let a VM read inputs and write outputs and checkpoints in the bucket."""

REGISTRY_READ_ROLES = {"roles/artifactregistry.reader", "roles/artifactregistry.writer",
                       "roles/artifactregistry.repoAdmin", "roles/artifactregistry.admin",
                       "roles/owner", "roles/editor"}
"""Roles that let a VM pull from an Artifact Registry repository."""

LAUNCH_PERMISSIONS = ["compute.instances.create", "iam.serviceAccounts.actAs", "serviceusage.services.enable"]
"""What launching needs of the caller (enabling APIs only when one is off)."""

GRANT_PERMISSIONS = ["iam.serviceAccounts.create", "resourcemanager.projects.setIamPolicy"]
"""What creating the VMs' service accounts and granting them roles needs of the caller
(Owner, or Service Account Admin + Project IAM Admin)."""

LOCAL_SSD_GB = 375
"""One local NVMe SSD on GCP."""


# --- what is asked for --------------------------------------------------------------------


@dataclass
class Need:
    """Quota one part of the plan uses."""

    metric: str
    """Compute Engine quota metric (``CPUS``, ``NVIDIA_V100_GPUS``...)."""
    amount: float
    region: str
    """Region of a regional quota; empty for a project-wide one (``*_ALL_REGIONS``)."""
    why: str
    spot: bool = False
    """Spot VMs use the ``PREEMPTIBLE_`` quota where the project has one, else this one."""


@dataclass
class Plan:
    """What ``sr cloud doctor`` checks: the project and the shapes that would run in it."""

    project: str
    region: str
    bucket: str = ""
    train: skypilot.TrainJob | None = None
    cluster: dict | None = None
    cluster_path: str = ""
    images: list[str] = field(default_factory=list)

    def service_accounts(self) -> dict[str, tuple[str, str]]:
        """email -> (whose VMs run as it, the tool that creates it or "" when it must exist)."""
        accounts = {}
        if self.train:
            accounts[raycluster.service_account_email(self.project, "skypilot-v1")] = ("SkyPilot's VMs", "SkyPilot")
        if self.cluster:
            ray = raycluster.service_account_email(self.project)
            accounts[ray] = ("the Ray head", "`ray up`")
            for email in worker_accounts(self.cluster):
                if email == ray:
                    accounts[ray] = ("the Ray head and GPU workers", "`ray up`")
                else:
                    accounts.setdefault(email, ("the Ray GPU workers", ""))
        return accounts


def worker_accounts(config: dict) -> list[str]:
    emails = []
    for name, node in config.get("available_node_types", {}).items():
        if name == config.get("head_node_type"):
            continue
        for account in node.get("node_config", {}).get("serviceAccounts", []):
            emails.append(account.get("email", ""))
    return emails


def _family_metric(machine_type: str) -> str:
    family = machine_type.split("-", 1)[0]
    return "CPUS" if family == "n1" else f"{family.upper()}_CPUS"


def _gpu_metric(gcp_type: str) -> str:
    """``nvidia-tesla-v100`` -> ``NVIDIA_V100_GPUS`` (Compute Engine's GPU quota names)."""
    name = gcp_type.removeprefix("nvidia-tesla-").removeprefix("nvidia-").upper().replace("-", "_")
    return f"NVIDIA_{name}_GPUS"


def preemptible_metric(metric: str) -> str:
    """The quota spot VMs use instead of ``metric`` when the project has it."""
    if metric == "LOCAL_SSD_TOTAL_GB":
        return "PREEMPTIBLE_LOCAL_SSD_GB"
    if metric.endswith("_GPUS"):
        return f"PREEMPTIBLE_{metric}"
    return "PREEMPTIBLE_CPUS"  # every machine family's vCPUs


def train_needs(job: skypilot.TrainJob, region: str) -> list[Need]:
    kind, count = job.accelerator
    host = skypilot.host_machine_type(kind, count)
    vcpus = skypilot.machine_vcpus(host) * job.nodes
    gpus = count * job.nodes
    what = f"training: {job.nodes} x {host}"
    controller = skypilot.CONTROLLER_MACHINE
    needs = [
        Need(_family_metric(host), vcpus, region, what, job.spot),
        Need(_gpu_metric(GPU_TYPES[kind.upper()]), gpus, region, f"training: {job.nodes} x {kind}:{count}", job.spot),
        Need("SSD_TOTAL_GB", job.disk_size * job.nodes, region, f"training: {job.nodes} x {job.disk_size} GB pd-balanced"),
        Need(_family_metric(controller), skypilot.machine_vcpus(controller), region, f"jobs controller: {controller}"),
        Need("SSD_TOTAL_GB", skypilot.CONTROLLER_DISK_GB, region, "jobs controller disk"),
        Need("IN_USE_ADDRESSES", job.nodes + 1, region, "an external IP per VM and the controller"),
        Need("CPUS_ALL_REGIONS", vcpus + skypilot.machine_vcpus(controller), "", f"{what} + {controller}"),
        Need("GPUS_ALL_REGIONS", gpus, "", f"training: {job.nodes} x {kind}:{count}"),
    ]
    if job.local_ssd:
        needs.append(Need("LOCAL_SSD_TOTAL_GB", LOCAL_SSD_GB * job.nodes, region,
                          f"training: a {LOCAL_SSD_GB} GB local SSD per VM", job.spot))
    return needs


def _spot(node_config: dict) -> bool:
    scheduling = node_config.get("scheduling", {})
    items = scheduling if isinstance(scheduling, list) else [scheduling]
    return any(i.get("provisioningModel") == "SPOT" or i.get("preemptible") for i in items)


def cluster_needs(config: dict) -> list[Need]:
    region = config["provider"]["region"]
    needs = []
    total_cpus = total_gpus = 0
    for name, node in config.get("available_node_types", {}).items():
        head = name == config.get("head_node_type")
        count = 1 if head else int(node.get("max_workers", 0))
        if count == 0:
            continue
        node_config = node.get("node_config", {})
        machine = node_config.get("machineType", "")
        vcpus = skypilot.machine_vcpus(machine) * count
        spot = _spot(node_config)
        label = f"batch: 1 x {machine} (head)" if head else f"batch: up to {count} x {machine}"
        needs.append(Need(_family_metric(machine), vcpus, region, label, spot))
        total_cpus += vcpus
        for accelerator in node_config.get("guestAccelerators", []):
            gpus = int(accelerator.get("acceleratorCount", 0)) * count
            total_gpus += gpus
            needs.append(Need(_gpu_metric(accelerator["acceleratorType"]), gpus, region,
                              f"batch: {count} x {accelerator['acceleratorType']}:{accelerator['acceleratorCount']}",
                              spot))
        for disk in node_config.get("disks", []):
            params = disk.get("initializeParams", {})
            kind = params.get("diskType", "pd-standard").rsplit("/", 1)[-1]
            metric = "DISKS_TOTAL_GB" if kind == "pd-standard" else "SSD_TOTAL_GB"
            needs.append(Need(metric, int(params.get("diskSizeGb", 10)) * count, region,
                              f"batch: {count} x {params.get('diskSizeGb', 10)} GB {kind}"))
        needs.append(Need("IN_USE_ADDRESSES", count, region, "batch: an external IP per node"))
    needs.append(Need("CPUS_ALL_REGIONS", total_cpus, "", "batch: head and workers"))
    if total_gpus:
        needs.append(Need("GPUS_ALL_REGIONS", total_gpus, "", "batch: the GPU workers"))
    return needs


def describe(plan: Plan) -> list[str]:
    """The plan in words (printed first, and alone without credentials)."""
    lines = [f"project {plan.project or '(none: pass --project or `gcloud config set project P`)'}"]
    if plan.train:
        job = plan.train
        kind, count = job.accelerator
        lines.append(f"training in {plan.region}: {job.nodes} x {skypilot.host_machine_type(kind, count)} + "
                     f"{kind}:{count}{' (spot)' if job.spot else ''}, {job.disk_size} GB pd-balanced each"
                     f"{f', a {LOCAL_SSD_GB} GB local SSD each' if job.local_ssd else ''}; the jobs controller "
                     f"{skypilot.CONTROLLER_MACHINE} (pinned to {plan.region} in ~/.sky/config.yaml, docs/CLOUD.md)")
    if plan.cluster:
        lines.append(f"batch cluster {plan.cluster['cluster_name']} ({plan.cluster_path}) in "
                     f"{plan.cluster['provider']['availability_zone']}: " + "; ".join(
                         n.why.removeprefix("batch: ") for n in cluster_needs(plan.cluster)
                         if n.metric.endswith("CPUS") and n.region))
    if plan.bucket:
        lines.append(f"bucket {plan.bucket}")
    for ref in plan.images:
        lines.append(f"image {ref}")
    return lines


def would_check(plan: Plan) -> list[str]:
    apis = sorted(REQUIRED_APIS) + ([REGISTRY_API] if _registry_images(plan) else [])
    checks = [f"APIs enabled: {', '.join(apis)}"]
    for need in all_needs(plan):
        metric = f"{need.metric} (or {preemptible_metric(need.metric)})" if need.spot else need.metric
        checks.append(f"quota {metric} in {need.region or 'all regions'}: {need.amount:g} for {need.why}")
    checks += [
        "GPUs offered in the VMs' zones",
        "your rights: " + ", ".join(LAUNCH_PERMISSIONS + GRANT_PERMISSIONS),
        "service accounts and their roles: " + ", ".join(plan.service_accounts()),
    ]
    if plan.bucket:
        checks.append(f"bucket {plan.bucket}: readable, and its location against the VMs' region")
    for ref in plan.images:
        checks.append(f"image {ref}: its repository, that it can be pulled, who may pull it")
    return checks


def all_needs(plan: Plan) -> list[Need]:
    needs = []
    if plan.train:
        needs += train_needs(plan.train, plan.region)
    if plan.cluster:
        needs += cluster_needs(plan.cluster)
    return needs


def _registry_images(plan: Plan) -> list[str]:
    return [ref for ref in plan.images if image.is_artifact_registry(image.split_image(ref)[0])]


# --- talking to Google --------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    data: dict
    headers: dict

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        error = self.data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return short_reason(error["message"], None)
        errors = self.data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message") or errors[0].get("code"))
        return f"HTTP {self.status}"


class Api:
    """Authorized JSON requests to Google's APIs (google-auth's requests session, which
    refreshes the access token from the credentials file's token endpoint)."""

    def __init__(self, credentials, root: str | None = None, timeout: float = 30.0):
        from google.auth.transport.requests import AuthorizedSession

        self.root = (root if root is not None else os.environ.get(API_ROOT_VARIABLE, "")).rstrip("/")
        token_uri = getattr(credentials, "token_uri", None)
        if self.root and token_uri and hasattr(credentials, "with_token_uri"):
            # The token endpoint is one more Google host: it moves with the others.
            credentials = credentials.with_token_uri(self.url(token_uri))
        self.session = AuthorizedSession(credentials)
        self.credentials = credentials
        self.timeout = timeout

    def url(self, url: str) -> str:
        if self.root and url.startswith("https://"):
            return f"{self.root}/{url.removeprefix('https://')}"
        return url

    def call(self, method: str, url: str, json_body: dict | None = None, authorized: bool = True,
             headers: dict | None = None) -> Reply:
        import google.auth.exceptions
        import requests

        target = self.url(url)
        sender = self.session if authorized else requests
        try:
            response = sender.request(method, target, json=json_body, headers=headers or {}, timeout=self.timeout)
        except google.auth.exceptions.RefreshError as exc:
            raise ValueError(f"your Google Cloud credentials were refused ({short_reason(exc)}): run "
                             "`gcloud auth application-default login`") from None
        except (requests.ConnectionError, requests.Timeout, google.auth.exceptions.TransportError) as exc:
            host = urllib.parse.urlsplit(url).netloc
            why = "timed out" if isinstance(exc, requests.Timeout) else "no connection"
            raise ConnectionError(f"cannot reach {host} ({why}); nothing was changed, rerun when the network "
                                  "is back") from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        return Reply(response.status_code, data if isinstance(data, dict) else {"items": data}, response.headers)

    def get(self, url: str, **kw) -> Reply:
        return self.call("GET", url, **kw)

    def post(self, url: str, body: dict | None = None) -> Reply:
        return self.call("POST", url, json_body=body or {})

    def token(self) -> str:
        if not self.credentials.valid:
            from google.auth.transport.requests import Request

            self.credentials.refresh(Request())
        return self.credentials.token


def load_credentials(path: str):
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.load_credentials_from_file(path, scopes=SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ValueError(f"{path}: not usable Google credentials ({short_reason(exc)})") from None
    return credentials


# --- the checks ---------------------------------------------------------------------------


@dataclass
class Check:
    status: str
    """``ok``, ``FAIL`` or ``warn``."""
    what: str
    fix: str = ""


def _quota_url(project: str) -> str:
    return f"https://console.cloud.google.com/iam-admin/quotas?project={project}"


def check_apis(api: Api, plan: Plan) -> tuple[list[Check], set[str]]:
    enabled: set[str] = set()
    token = ""
    while True:
        query = urllib.parse.urlencode({"filter": "state:ENABLED", "pageSize": 200, **({"pageToken": token}
                                                                                       if token else {})})
        reply = api.get(f"https://serviceusage.googleapis.com/v1/projects/{plan.project}/services?{query}")
        if not reply.ok:
            return [Check("FAIL", f"cannot list the project's APIs: {reply.message}",
                          f"gcloud services enable serviceusage.googleapis.com --project {plan.project}")], enabled
        for service in reply.data.get("services", []):
            enabled.add(service.get("config", {}).get("name") or service.get("name", "").rsplit("/", 1)[-1])
        token = reply.data.get("nextPageToken", "")
        if not token:
            break
    wanted = dict(REQUIRED_APIS)
    if _registry_images(plan):
        wanted[REGISTRY_API] = "Artifact Registry (the image)"
    checks = []
    for name, why in wanted.items():
        if name in enabled:
            checks.append(Check("ok", f"API {name} enabled: {why}"))
        else:
            checks.append(Check("FAIL", f"API {name} is not enabled: {why}",
                                f"gcloud services enable {name} --project {plan.project}"))
    return checks, enabled


def _quota_table(quotas: list[dict]) -> dict[str, tuple[float, float]]:
    return {q["metric"]: (float(q.get("limit", 0)), float(q.get("usage", 0))) for q in quotas}


def check_quotas(api: Api, plan: Plan) -> list[Check]:
    needs = all_needs(plan)
    regions = sorted({n.region for n in needs if n.region})
    tables: dict[str, dict[str, tuple[float, float]]] = {}
    checks = []
    reply = api.get(f"https://compute.googleapis.com/compute/v1/projects/{plan.project}")
    if not reply.ok:
        return [Check("FAIL", f"cannot read the project's quotas: {reply.message}",
                      f"gcloud services enable compute.googleapis.com --project {plan.project}")]
    tables[""] = _quota_table(reply.data.get("quotas", []))
    for region in regions:
        reply = api.get(f"https://compute.googleapis.com/compute/v1/projects/{plan.project}/regions/{region}")
        if not reply.ok:
            checks.append(Check("FAIL", f"cannot read the quotas of {region}: {reply.message}"))
            continue
        tables[region] = _quota_table(reply.data.get("quotas", []))
    # Spot VMs use the PREEMPTIBLE_ quota where the project has one (a limit above 0),
    # else the standard quota.
    totals: dict[tuple[str, str], tuple[float, list[str]]] = {}
    for need in needs:
        table = tables.get(need.region)
        if table is None:
            continue
        metric = need.metric
        if need.spot and table.get(preemptible_metric(metric), (0, 0))[0] > 0:
            metric = preemptible_metric(metric)
        amount, why = totals.get((need.region, metric), (0.0, []))
        totals[(need.region, metric)] = (amount + need.amount, why + [f"{need.why}: {need.amount:g}"])
    for (region, metric), (amount, why) in sorted(totals.items()):
        where = region or "all regions"
        limit, usage = tables[region].get(metric, (None, 0.0))
        detail = "; ".join(why)
        if limit is None:
            checks.append(Check("FAIL", f"quota {metric} ({where}) not found in the project; need {amount:g} ({detail})",
                                f"request it at {_quota_url(plan.project)}"))
        elif usage + amount > limit:
            checks.append(Check("FAIL", f"quota {metric} ({where}): need {amount:g} ({detail}), limit {limit:g}, "
                                        f"in use {usage:g}",
                                f"request {metric} >= {usage + amount:g} in {where} at {_quota_url(plan.project)}"))
        else:
            checks.append(Check("ok", f"quota {metric} ({where}): need {amount:g}, limit {limit:g}, in use {usage:g}"))
    return checks


def check_zones(api: Api, plan: Plan) -> list[Check]:
    wanted: dict[str, set[str]] = {}  # GCP accelerator type -> acceptable zones ("REGION-" prefix or a zone)
    if plan.train:
        kind, _ = plan.train.accelerator
        where = plan.train.zone or f"{plan.region}-"
        wanted.setdefault(GPU_TYPES[kind.upper()], set()).add(where)
    if plan.cluster:
        zone = plan.cluster["provider"]["availability_zone"]
        for node in plan.cluster.get("available_node_types", {}).values():
            for accelerator in node.get("node_config", {}).get("guestAccelerators", []):
                wanted.setdefault(accelerator["acceleratorType"], set()).add(zone)
    checks = []
    for gpu, places in sorted(wanted.items()):
        query = urllib.parse.urlencode({"filter": f'name = "{gpu}"'})
        reply = api.get(f"https://compute.googleapis.com/compute/v1/projects/{plan.project}/aggregated/"
                        f"acceleratorTypes?{query}")
        if not reply.ok:
            checks.append(Check("FAIL", f"cannot list the zones offering {gpu}: {reply.message}"))
            continue
        zones = sorted(key.removeprefix("zones/") for key, value in reply.data.get("items", {}).items()
                       if any(t.get("name") == gpu for t in value.get("acceleratorTypes", [])))
        for place in sorted(places):
            here = [z for z in zones if z == place or (place.endswith("-") and z.startswith(place))]
            label = place.rstrip("-")
            if here:
                checks.append(Check("ok", f"{gpu} offered in {label} ({', '.join(here)})"))
            else:
                nearby = ", ".join(zones[:8]) or "none"
                checks.append(Check("FAIL", f"{gpu} is not offered in {label}",
                                    f"choose a region/zone that has it: {nearby}"))
    return checks


def _members_roles(policy: dict, member: str) -> set[str]:
    return {b.get("role", "") for b in policy.get("bindings", []) if member in b.get("members", [])}


def check_accounts(api: Api, plan: Plan, project_policy: dict | None, bucket_policy: dict | None,
                   repo_policies: dict[str, dict | None]) -> tuple[list[Check], bool]:
    """The VMs' service accounts: there (or created by their tool), with storage roles, and
    with a reader role on each Artifact Registry repository. Returns the checks and
    whether the caller will have to create an account or grant a role."""
    checks = []
    grants_needed = False
    for email, (who, creator) in plan.service_accounts().items():
        reply = api.get(f"https://iam.googleapis.com/v1/projects/{plan.project}/serviceAccounts/{email}")
        member = f"serviceAccount:{email}"
        if reply.status == 404:
            grants_needed = True
            if creator and not _registry_images(plan):
                checks.append(Check("ok", f"service account {email} ({who}) does not exist yet; {creator} creates it "
                                          "with its roles"))
            elif creator:
                account_id = email.split("@", 1)[0]
                fixes = [f"gcloud iam service-accounts create {account_id} --project {plan.project}"]
                fixes += [_reader_fix(member, ref) for ref in _registry_images(plan)]
                checks.append(Check("FAIL", f"service account {email} ({who}) does not exist yet, so it cannot have "
                                            "the Artifact Registry role it needs to pull the image (create it now; "
                                            f"{creator} then adopts it)", " && ".join(fixes)))
            else:
                checks.append(Check("FAIL", f"service account {email} ({who}) does not exist",
                                    f"gcloud iam service-accounts create {email.split('@', 1)[0]} --project "
                                    f"{plan.project}, or leave --service-account out"))
            continue
        if not reply.ok:
            checks.append(Check("FAIL", f"cannot read service account {email}: {reply.message}"))
            continue
        roles = _members_roles(project_policy or {}, member) | _members_roles(bucket_policy or {}, member)
        if roles & STORAGE_ROLES:
            checks.append(Check("ok", f"{email} ({who}) has {', '.join(sorted(roles & STORAGE_ROLES))}"))
        elif creator:
            # SkyPilot and `ray up` bind their account's roles (storage included) at launch.
            grants_needed = True
            checks.append(Check("ok", f"{email} ({who}) has no storage role yet; {creator} grants it at launch"))
        else:
            grants_needed = True
            target = f"gs://{_bucket_name(plan.bucket)}" if plan.bucket else "gs://BUCKET"
            checks.append(Check("FAIL", f"{email} ({who}) cannot read or write {target}",
                                f"gcloud storage buckets add-iam-policy-binding {target} --member={member} "
                                "--role=roles/storage.objectAdmin"))
        for ref in _registry_images(plan):
            host, path, _ = image.split_image(ref)
            repo_roles = _members_roles(repo_policies.get(_repo_key(host, path)) or {}, member)
            if (roles | repo_roles) & REGISTRY_READ_ROLES:
                checks.append(Check("ok", f"{email} may pull from {host}/{'/'.join(path.split('/')[:2])}"))
            else:
                grants_needed = True
                checks.append(Check("FAIL", f"{email} ({who}) may not pull {ref} (no Artifact Registry read role)",
                                    _reader_fix(member, ref)))
    return checks, grants_needed


def _reader_fix(member: str, ref: str) -> str:
    host, path, _ = image.split_image(ref)
    project, repo = path.split("/")[:2]
    return (f"gcloud artifacts repositories add-iam-policy-binding {repo} --project {project} --location "
            f"{image.artifact_registry_location(host)} --member={member} --role=roles/artifactregistry.reader")


def _bucket_name(bucket: str) -> str:
    return bucket.removeprefix("gs://").split("/", 1)[0]


def _repo_key(host: str, path: str) -> str:
    parts = path.split("/")
    return f"{host}/{parts[0]}/{parts[1] if len(parts) > 1 else ''}"


def _continent(location: str) -> str:
    location = location.lower()
    for prefix, continent in (("northamerica", "us"), ("southamerica", "us"), ("us", "us"), ("europe", "eu"),
                              ("eu", "eu"), ("asia", "asia"), ("australia", "asia"), ("me-", "me")):
        if location.startswith(prefix):
            return continent
    return location


def check_bucket(api: Api, plan: Plan) -> tuple[list[Check], dict | None]:
    name = _bucket_name(plan.bucket)
    reply = api.get(f"https://storage.googleapis.com/storage/v1/b/{urllib.parse.quote(name, safe='')}")
    if reply.status == 404:
        return [Check("FAIL", f"bucket gs://{name} does not exist",
                      f"gcloud storage buckets create gs://{name} --location={plan.region} "
                      f"--project {plan.project} --uniform-bucket-level-access")], None
    if not reply.ok:
        return [Check("FAIL", f"cannot read bucket gs://{name}: {reply.message}")], None
    location = str(reply.data.get("location", "")).lower()
    kind = reply.data.get("locationType", "region")
    regions = set()
    if plan.train:
        regions.add(plan.region)
    if plan.cluster:
        regions.add(plan.cluster["provider"]["region"])
    checks = []
    for region in sorted(regions):
        if location == region:
            checks.append(Check("ok", f"bucket gs://{name} is in {region}, with the VMs"))
        elif kind in ("multi-region", "dual-region") and _continent(location) == _continent(region):
            checks.append(Check("warn", f"bucket gs://{name} is {kind} {location.upper()}; the VMs run in {region}",
                                "a regional bucket in the VMs' region reads fastest"))
        else:
            checks.append(Check("FAIL", f"bucket gs://{name} is in {location} but the VMs run in {region}: every "
                                        "read crosses regions (slower, billed per GB)",
                                f"run the VMs in {location} (--region) or use a bucket in {region}"))
    policy = api.get(f"https://storage.googleapis.com/storage/v1/b/{urllib.parse.quote(name, safe='')}/iam")
    return checks, policy.data if policy.ok else None


def _www_authenticate(header: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def check_images(api: Api, plan: Plan) -> tuple[list[Check], dict[str, dict | None]]:
    checks = []
    policies: dict[str, dict | None] = {}
    for ref in plan.images:
        host, path, tag = image.split_image(ref)
        if not image.is_artifact_registry(host):
            checks.append(Check("warn", f"image {ref}: not in Artifact Registry, not checked (SkyPilot logs in "
                                        "with SKYPILOT_DOCKER_USERNAME/PASSWORD when they are set)"))
            continue
        parts = path.split("/")
        if len(parts) < 3:
            checks.append(Check("FAIL", f"image {ref}: an Artifact Registry image is HOST/PROJECT/REPOSITORY/IMAGE"))
            continue
        project, repo = parts[0], parts[1]
        location = image.artifact_registry_location(host)
        repo_url = (f"https://artifactregistry.googleapis.com/v1/projects/{project}/locations/{location}/"
                    f"repositories/{repo}")
        reply = api.get(repo_url)
        if reply.status == 404:
            checks.append(Check("FAIL", f"image {ref}: no repository {repo} in {location}",
                                f"gcloud artifacts repositories create {repo} --repository-format=docker "
                                f"--location={location} --project {project}"))
            continue
        if not reply.ok:
            checks.append(Check("FAIL", f"image {ref}: cannot read repository {repo}: {reply.message}"))
            continue
        policy = api.get(f"{repo_url}:getIamPolicy")
        policies[_repo_key(host, path)] = policy.data if policy.ok else None
        checks.append(pull_manifest(api, host, path, tag, ref))
    return checks, policies


def pull_manifest(api: Api, host: str, path: str, tag: str, ref: str) -> Check:
    """Fetch the image's manifest as ``docker pull`` does (Docker Registry API v2 with a
    bearer token from the registry's token service, logged in as ``oauth2accesstoken``)."""
    accept = ", ".join(["application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json",
                        "application/vnd.docker.distribution.manifest.v2+json"])
    url = f"https://{host}/v2/{path}/manifests/{tag}"
    reply = api.get(url, authorized=False, headers={"Accept": accept})
    if reply.status == 401:
        challenge = _www_authenticate(reply.headers.get("WWW-Authenticate", ""))
        if "realm" not in challenge:
            return Check("FAIL", f"image {ref}: the registry asked for a login it did not describe")
        query = urllib.parse.urlencode({k: v for k, v in challenge.items() if k in ("service", "scope")})
        basic = base64.b64encode(f"oauth2accesstoken:{api.token()}".encode()).decode()
        grant = api.get(f"{challenge['realm']}?{query}", authorized=False, headers={"Authorization": f"Basic {basic}"})
        if not grant.ok:
            return Check("FAIL", f"image {ref}: the registry refused your credentials ({grant.message})",
                         "ask for roles/artifactregistry.reader on the repository")
        token = grant.data.get("token") or grant.data.get("access_token", "")
        reply = api.get(url, authorized=False, headers={"Accept": accept, "Authorization": f"Bearer {token}"})
    if reply.ok:
        return Check("ok", f"image {ref} can be pulled ({reply.data.get('mediaType', 'manifest')})")
    if reply.status == 404:
        return Check("FAIL", f"image {ref} does not exist ({reply.message})",
                     f"gcloud auth configure-docker {host} && docker build -t {host}/{path}:{tag} . && "
                     f"docker push {host}/{path}:{tag}")
    return Check("FAIL", f"image {ref} cannot be pulled: {reply.message}")


def check_rights(api: Api, plan: Plan, grants_needed: bool, apis_off: bool) -> list[Check]:
    wanted = LAUNCH_PERMISSIONS + GRANT_PERMISSIONS
    reply = api.post(f"https://cloudresourcemanager.googleapis.com/v1/projects/{plan.project}:testIamPermissions",
                     {"permissions": wanted})
    if not reply.ok:
        return [Check("FAIL", f"cannot test your rights in {plan.project}: {reply.message}")]
    held = set(reply.data.get("permissions", []))
    required = {"compute.instances.create", "iam.serviceAccounts.actAs"}
    if apis_off:
        required.add("serviceusage.services.enable")
    if grants_needed:
        required.update(GRANT_PERMISSIONS)
    checks = []
    for permission in wanted:
        if permission in held:
            checks.append(Check("ok", f"you have {permission}"))
        elif permission in required:
            checks.append(Check("FAIL", f"you lack {permission}, which this setup needs",
                                "ask a project Owner for roles/owner, or roles/iam.serviceAccountAdmin + "
                                "roles/resourcemanager.projectIamAdmin (service accounts and their roles), "
                                "roles/compute.admin + roles/iam.serviceAccountUser (VMs), "
                                "roles/serviceusage.serviceUsageAdmin (APIs)"))
        else:
            checks.append(Check("ok", f"you lack {permission}, not needed as things stand"))
    return checks


def run_checks(api: Api, plan: Plan) -> list[Check]:
    """Every check, in the order a user fixes things: APIs, rights, quotas, zones, bucket,
    image, service accounts."""
    checks, enabled = check_apis(api, plan)
    apis_off = any(c.status == "FAIL" for c in checks)
    policy = api.post(f"https://cloudresourcemanager.googleapis.com/v1/projects/{plan.project}:getIamPolicy",
                      {"options": {"requestedPolicyVersion": 3}})
    project_policy = policy.data if policy.ok else None
    if project_policy is None:
        checks.append(Check("FAIL", f"cannot read the project's IAM policy: {policy.message}"))
    later: list[Check] = []
    bucket_policy = None
    if "compute.googleapis.com" in enabled:
        later += check_quotas(api, plan)
        later += check_zones(api, plan)
    if plan.bucket:
        bucket_checks, bucket_policy = check_bucket(api, plan)
        later += bucket_checks
    image_checks, repo_policies = check_images(api, plan)
    later += image_checks
    account_checks, grants_needed = check_accounts(api, plan, project_policy, bucket_policy, repo_policies)
    checks += check_rights(api, plan, grants_needed, apis_off)
    return checks + later + account_checks
