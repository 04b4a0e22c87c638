"""Fail in seconds, before any cloud tool starts, when it could not work anyway.

Only local files are looked at: asking Google's auth library would also probe the GCE
metadata server over the network, and SkyPilot and Ray's cluster launcher both need the
gcloud credential files checked here (a VM's own service account is not enough for them).
"""

from __future__ import annotations

import os
import shutil
import sys


def tool_path(name: str) -> str:
    """The executable ``name`` from this environment (``sr`` and ``sky``/``ray`` are
    installed side by side), else from PATH; ValueError naming the install."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise ValueError(f"`{name}` is not installed: pip install 'sr-cloud[cloud]' "
                         "(--dry-run works without it)")
    return found


def gcp_credentials() -> str | None:
    """The credentials file gcloud-based tools would use, or None."""
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key:
        return key if os.path.isfile(key) else None
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    adc = os.path.join(config, "application_default_credentials.json")
    return adc if os.path.isfile(adc) else None


def gcloud_project() -> str:
    """The project gcloud would use: $CLOUDSDK_CORE_PROJECT, $GOOGLE_CLOUD_PROJECT, else
    the active gcloud configuration's ``[core] project`` (``gcloud config set project``)."""
    import configparser

    for name in ("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT"):
        if os.environ.get(name):
            return os.environ[name]
    folder = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    try:
        with open(os.path.join(folder, "active_config")) as f:
            active = f.read().strip() or "default"
    except OSError:
        active = "default"
    parser = configparser.ConfigParser()
    parser.read(os.path.join(folder, "configurations", f"config_{active}"))
    return parser.get("core", "project", fallback="")


def require_gcp(tool: str) -> str:
    """Path of ``tool`` when it and Google Cloud credentials are present; else a
    one-line ValueError saying what to do."""
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key and not os.path.isfile(key):
        raise ValueError(f"GOOGLE_APPLICATION_CREDENTIALS={key}: no such file")
    if gcp_credentials() is None:
        raise ValueError("no Google Cloud credentials: run `gcloud auth login` and "
                         "`gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS "
                         "to a service-account key file); see docs/CLOUD.md. --dry-run needs none")
    return tool_path(tool)
