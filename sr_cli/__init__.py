"""The ``sr`` command, the outermost layer: one table of commands (``sr_cli.main.COMMANDS``),
one exit-code policy (``sr_core.errors``), and every parser with its handler (upscale,
batch, eval, convert/interpolate, prepare/train/train export, cloud, tensorboard), built
with the option groups of ``sr_cli.options``. A handler parses, calls one library
function and prints. No other package imports this one: the training VMs run
``python -m jobs.train``, which reads the job's own arguments from ``jobs.arguments``."""
