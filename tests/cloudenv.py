"""Fixtures shared by the `sr cloud` tests: an environment that cannot reach a cloud,
and `sr` run in this process."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No credentials, an empty HOME and gcloud folder, and proxies at a closed loopback
    port (9) for anything not on loopback: set in this process (for `sr` run in-process)
    and returned for child processes."""
    (tmp_path / "home").mkdir()
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "CLOUDSDK_CORE_PROJECT",
                 "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    changes = {"HOME": str(tmp_path / "home"), "CLOUDSDK_CONFIG": str(tmp_path / "home" / "gcloud"),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        changes[name] = "http://127.0.0.1:9"
    for name, value in changes.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)


@pytest.fixture
def sr(capsys):
    """``sr ARGS`` in this process (what the `sr` entry point runs), with its exit code and
    output; dry runs contact nothing, so no child process is needed."""
    from sr_cli.main import main

    def run(args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run
