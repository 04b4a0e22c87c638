"""What ``sr cloud doctor`` checks a project for: the plan (the project, the shapes that would
run in it, the bucket, the images), the quota each part of it needs, and the plan in words
(printed first, and alone with ``--dry-run``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from infra import image, raycluster, skypilot

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

LAUNCH_PERMISSIONS = ["compute.instances.create", "iam.serviceAccounts.actAs", "serviceusage.services.enable"]
"""What launching needs of the caller (enabling APIs only when one is off)."""

GRANT_PERMISSIONS = ["iam.serviceAccounts.create", "resourcemanager.projects.setIamPolicy"]
"""What creating the VMs' service accounts and granting them roles needs of the caller
(Owner, or Service Account Admin + Project IAM Admin)."""

LOCAL_SSD_GB = 375
"""One local NVMe SSD on GCP."""


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
    apis = sorted(REQUIRED_APIS) + ([REGISTRY_API] if registry_images(plan) else [])
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


def registry_images(plan: Plan) -> list[str]:
    """The plan's images that live in Artifact Registry (the others are not checked)."""
    return [ref for ref in plan.images if image.is_artifact_registry(image.split_image(ref)[0])]
