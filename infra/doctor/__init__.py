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
Nothing is changed in the project: the checks only read.

Three modules, one idea each: ``plan`` (what is asked for: the shapes, the quota they
need, the plan in words), ``api`` (talking to Google: the authorized HTTP client, where
``SR_GOOGLE_API_ROOT`` redirects every host), ``checks`` (one check per Google API and
``run_checks``, which runs them in the order a user fixes things). The names below are
what the ``sr cloud doctor`` handler uses.
"""

from infra.doctor.api import API_ROOT_VARIABLE, SCOPES, Api, Reply, load_credentials
from infra.doctor.checks import (REGISTRY_READ_ROLES, STORAGE_ROLES, Check, check_accounts, check_apis,
                                 check_bucket, check_images, check_quotas, check_rights, check_zones,
                                 pull_manifest, run_checks)
from infra.doctor.plan import (GPU_TYPES, GRANT_PERMISSIONS, LAUNCH_PERMISSIONS, LOCAL_SSD_GB, REGISTRY_API,
                               REQUIRED_APIS, Need, Plan, all_needs, cluster_needs, describe, preemptible_metric,
                               registry_images, train_needs, worker_accounts, would_check)

__all__ = [
    "API_ROOT_VARIABLE", "GPU_TYPES", "GRANT_PERMISSIONS", "LAUNCH_PERMISSIONS", "LOCAL_SSD_GB", "REGISTRY_API",
    "REGISTRY_READ_ROLES", "REQUIRED_APIS", "SCOPES", "STORAGE_ROLES", "Api", "Check", "Need", "Plan", "Reply",
    "all_needs", "check_accounts", "check_apis", "check_bucket", "check_images", "check_quotas", "check_rights",
    "check_zones", "cluster_needs", "describe", "load_credentials", "preemptible_metric", "pull_manifest",
    "registry_images", "run_checks", "train_needs", "worker_accounts", "would_check",
]
