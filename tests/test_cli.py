"""The `sr` command itself: one table of every command, `sr --help` kept instant (no torch
import until a subcommand runs), and the layering of the packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_package_and_imports_no_torch():
    code = (
        "import sys\n"
        "from sr_cli.main import build_parser\n"
        "help_text = build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'accelerate') if m in sys.modules))\n"
        "print(help_text)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    heavy, _, help_text = done.stdout.partition("\n")
    assert heavy == "[]"
    for command in ("upscale", "batch", "eval", "convert", "interpolate", "prepare", "train", "cloud", "tensorboard"):
        assert f"\n    {command}" in help_text, command


def test_missing_subcommand_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "sr_cli"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: sr" in done.stderr


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_parses_no_arguments_and_packages_use_no_other_command_module():
    # sr_core is what a Python user imports: the command line lives in sr_cli.
    for path in sorted((REPO / "sr_core").rglob("*.py")):
        assert not {"argparse", "sr_cli"} & _imports(path), path
    # Every parser of the `sr` command lives in sr_cli: jobs, batch and infra import none
    # of it (tests/test_imports.py checks the whole graph).
    for package in ("jobs", "batch", "infra"):
        for path in sorted((REPO / package).rglob("*.py")):
            foreign = {m for m in _imports(path) if m == "sr_cli" or m.startswith("sr_cli.")}
            assert not foreign, f"{path} imports {sorted(foreign)}"


def test_the_readme_names_every_command_and_cloud_action():
    """README's table of `sr` commands is the user's map: a command or an `sr cloud`
    action that the parser has and the table lacks is a command nobody finds."""
    import argparse
    import re

    from sr_cli.main import COMMANDS, build_parser

    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `sr ")]
    named = {re.match(r"\| `sr (\S+)", row).group(1) for row in rows}
    assert set(COMMANDS) <= named, sorted(set(COMMANDS) - named)
    (cloud_row,) = [row for row in rows if row.startswith("| `sr cloud ")]
    documented = set(re.match(r"\| `sr cloud (\S+)`", cloud_row).group(1).split("\\|"))
    cloud = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["cloud"]
    actions = next(a for a in cloud._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(actions) == documented, (sorted(actions), sorted(documented))
