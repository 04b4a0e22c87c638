"""The ``sr`` command: one table of commands (``sr_cli.main.COMMANDS``) and one
exit-code policy (``sr_core.errors``). The parsers of sr_core's commands (upscale, eval,
convert, interpolate) live here, with the option groups several commands share; the
training, batch and cloud packages keep the parsers of their own commands, which the
table names, built with the option groups of ``sr_cli.options``. sr_core never imports
this package; jobs, batch and infra import only ``sr_cli.options``."""
