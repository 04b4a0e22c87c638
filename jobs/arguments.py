"""The training job's own arguments: ``[CONFIG] [section.field=value ...] --preset
--resume``, what the training VMs and the multi-process launcher pass to ``python -m
jobs.train``.

They are defined here, in a module that imports no torch, because two entry points read
them: ``python -m jobs.train`` (which must not load the ``sr`` command: a VM runs the job,
not the command line) and ``sr train`` (sr_cli/train.py, which adds its own options
around them and must keep ``sr --help`` free of torch). Every other parser lives in
sr_cli."""

from __future__ import annotations

import argparse

CONFIG_ARGS_METAVAR = "[CONFIG] [section.field=value ...]"
CONFIG_ARGS_HELP = ("an optional YAML or JSON config file, then dotted overrides applied over it "
                    "(e.g. train.run_dir=gs://bucket/runs/x4 data.batch_size=8)")


PRESET_HELP = "starting values: {names} (default: default)"


class PresetNamesFormatter(argparse.HelpFormatter):
    """Lists the presets in ``--preset``'s help only when the help is shown: the presets
    live in jobs.config, whose import brings torch (the Real-ESRGAN degradation options),
    and ``sr --help`` imports no torch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help is PRESET_HELP:
            from jobs.config import PRESETS

            return PRESET_HELP.format(names=", ".join(PRESETS))
        return action.help


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and ``--resume`` (their parser's ``formatter_class`` is
    :class:`PresetNamesFormatter`)."""
    parser.add_argument("--preset", default="default", help=PRESET_HELP)
    parser.add_argument("--resume", default="", metavar="auto|CHECKPOINT",
                        help="'auto': continue from the run's newest complete checkpoint, or start fresh "
                             "when there is none; or a checkpoint folder URL (default: start fresh)")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The config items (positional) and the job's options."""
    parser.add_argument("args", nargs="*", metavar=CONFIG_ARGS_METAVAR, help=CONFIG_ARGS_HELP)
    add_job_options(parser)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m jobs.train``; parse with ``parse_intermixed_args``, so
    options may come between the overrides (``CONFIG --resume auto train.run_dir=...``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=PresetNamesFormatter)
    add_job_arguments(parser)
    return parser
