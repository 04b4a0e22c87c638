"""The checks of ``sr cloud doctor``, one function per Google API, each reading only: a
check says ``ok``, ``FAIL`` or ``warn``, and how to fix it."""

from __future__ import annotations

import base64
import re
import urllib.parse
from dataclasses import dataclass

from infra import image
from infra.doctor.api import Api
from infra.doctor.plan import (GPU_TYPES, GRANT_PERMISSIONS, LAUNCH_PERMISSIONS, REGISTRY_API, REQUIRED_APIS, Plan,
                               all_needs, preemptible_metric, registry_images)

STORAGE_ROLES = {"roles/storage.admin", "roles/storage.objectAdmin", "roles/storage.objectUser",
                 "roles/owner", "roles/editor"}
"""Roles that let a VM read inputs and write outputs and checkpoints in the bucket."""

REGISTRY_READ_ROLES = {"roles/artifactregistry.reader", "roles/artifactregistry.writer",
                       "roles/artifactregistry.repoAdmin", "roles/artifactregistry.admin",
                       "roles/owner", "roles/editor"}
"""Roles that let a VM pull from an Artifact Registry repository."""


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
    if registry_images(plan):
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
            if creator and not registry_images(plan):
                checks.append(Check("ok", f"service account {email} ({who}) does not exist yet; {creator} creates it "
                                          "with its roles"))
            elif creator:
                account_id = email.split("@", 1)[0]
                fixes = [f"gcloud iam service-accounts create {account_id} --project {plan.project}"]
                fixes += [_reader_fix(member, ref) for ref in registry_images(plan)]
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
        for ref in registry_images(plan):
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
