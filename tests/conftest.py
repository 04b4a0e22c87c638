"""Shared fixtures: a real GCS API server (gcp-storage-emulator) on 127.0.0.1.

The emulator runs as its own process, so DataLoader workers, ``sr`` subprocesses and
Ray workers started by a test all reach it through ``STORAGE_EMULATOR_HOST``, which the
fixture sets for the whole session (child processes inherit it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest
from events import server_in_env, wait_listening
from ports import free_port

# gcsfs 2026.x probes buckets over gRPC unless told not to (a 60 s hang per operation
# against the emulator); this must be set before gcsfs is first imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def pytest_configure(config):
    # `-m faults_full` runs the reliability suite with its full seed and kill counts;
    # the default run (CI) runs the same tests with fewer.
    if "faults_full" in (config.option.markexpr or ""):
        os.environ["SR_FAULTS"] = "full"


@dataclass
class GcsEmulator:
    """A running emulator: ``url`` is what ``STORAGE_EMULATOR_HOST`` holds."""

    url: str
    process: subprocess.Popen

    def fs(self):
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon")

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, empty bucket and return its ``gs://NAME`` URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    port = free_port()
    # Its log goes to a file, never a pipe: the emulator serves one request at a time and
    # prints a traceback for every connection a fault or kill test cuts, so an unread
    # pipe fills up over a session and the server stops, waiting to write to it.
    log_path = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
         f"--port={port}", "--in-memory", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    log.close()  # the child has its own copy
    wait_listening(port, "gcp-storage-emulator", process, log_path)
    url = f"http://127.0.0.1:{port}"
    with server_in_env(process, STORAGE_EMULATOR_HOST=url):
        yield GcsEmulator(url=url, process=process)


@pytest.fixture(autouse=True)
def _fresh_gcsfs_instances():
    """gcsfs caches filesystem instances (and their listings) across calls; start and
    end every test with none, so no test sees another's stale listing."""
    def clear():
        gcsfs = sys.modules.get("gcsfs")  # only if some code already imported it
        if gcsfs is not None:
            gcsfs.GCSFileSystem.clear_instance_cache()

    clear()
    yield
    clear()


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> str:
    """A tiny random x2 RRDBNet file (seed 0), for commands that need some model."""
    import torch

    from sr_core import build_generator, save_generator

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "tiny_x2.safetensors")
    save_generator(build_generator("rrdbnet", "tiny", scale=2), path)
    return path
