"""The `sr` command itself: subcommands discovered through the entry-point group, and
`sr --help` kept instant (no torch import until a subcommand runs)."""

from __future__ import annotations

import subprocess
import sys


def test_help_lists_every_package_and_imports_no_torch():
    code = (
        "import sys\n"
        "from sr_core.main import build_parser\n"
        "help_text = build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'accelerate') if m in sys.modules))\n"
        "print(help_text)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    heavy, _, help_text = done.stdout.partition("\n")
    assert heavy == "[]"
    for command in ("convert", "interpolate", "upscale", "eval", "prepare", "batch"):
        assert command in help_text


def test_missing_subcommand_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "sr_core.main"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: sr" in done.stderr
