"""The output folder of every ``sr cloud`` command that would call a cloud tool: the files
it generated and ``commands.sh`` (the exact commands), printed before anything runs, so
that ``--dry-run`` shows everything and a real run can be repeated by hand."""

from __future__ import annotations

import os
import sys

from infra import shell

DEFAULT_OUT = "sr-cloud-out"
"""Where the generated files go without ``--out``: ``sr-cloud-out/<name>/``."""


def project_dir() -> str:
    """The checkout that SkyPilot and Ray copy to the VMs (this installed package's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")) or not os.path.isdir(os.path.join(root, "jobs")):
        raise ValueError(f"{root} is not an sr-cloud checkout: `sr cloud` ships the checkout it is installed "
                         "from to the VMs, so install with `pip install -e .` from a clone")
    return root


def dump_yaml(data) -> str:
    """YAML with multi-line strings (the scripts) as readable literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def str_presenter(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, str_presenter)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=120)


def out_dir(out: str | None, name: str) -> str:
    """``--out`` (``out``), else ``sr-cloud-out/NAME``, as an absolute path; NAME has been checked to be one folder name,
    and a path that would still leave sr-cloud-out/ is refused (nothing is written)."""
    if not out:
        out = os.path.join(DEFAULT_OUT, name)
        inside = os.path.realpath(DEFAULT_OUT) + os.sep
        if not os.path.realpath(out).startswith(inside):
            raise ValueError(f"{shell.shown(name)}: not a folder name inside {DEFAULT_OUT}/")
    os.makedirs(out, exist_ok=True)
    # Absolute: commands.sh names its files by this path and must run from any folder.
    return os.path.abspath(out)


def write(path: str, text: str, executable: bool = False) -> None:
    with open(path, "w") as f:
        f.write(text)
    if executable:
        os.chmod(path, 0o755)


def commands_sh(commands: list[str], notes: list[str]) -> str:
    lines = ["#!/usr/bin/env bash", "# Written by sr cloud: the commands it runs (or would run with --dry-run).",
             "set -euo pipefail"]
    lines += [shell.comment(n) for n in notes]
    lines += commands
    return "\n".join(lines) + "\n"


def print_plan(out: str, commands: list[list[str]], dry_run: bool) -> None:
    print(f"commands: {os.path.join(out, 'commands.sh')}")
    print("dry run: nothing was submitted; these would run:" if dry_run else "running:")
    for c in commands:
        print("  " + shell.line(c))
    sys.stdout.flush()


def run_tool(tool_path: str, command: list[str], capture: bool = False):
    import subprocess

    return subprocess.run([tool_path, *command[1:]], text=True, capture_output=capture)
