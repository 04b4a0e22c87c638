"""Typed configuration for the training job, in three parts:

- the schema (``schema.py``): one dataclass per section, each field with its type
  (choices as ``Literal[...]``), default, declared range and a docstring right below it;
  ``typed.py`` holds the one generic check that reads those annotations and ranges;
  ``checks.py`` the checks across fields and those that read storage;
- the loader (``loader.py``): a preset, then a YAML or JSON file, then dotted overrides
  from the command line (``data.gt_size=128``), in that order, merged by the schema's
  types. An unknown key or a value of the wrong type is a ``ValueError`` that names the
  field; nothing is silently defaulted;
- the presets: YAML files shipped in this package, ``presets/NAME.yaml``.

The config reference in docs/TRAINING.md is generated from the schema
(``python -m jobs.config``, ``reference.py``).
"""

from jobs.config.checks import check_inputs, validate
from jobs.config.loader import (
    MAX_DEPTH,
    MAX_FILE,
    MAX_NODES,
    MAX_OVERRIDE,
    MAX_STRING,
    PRESETS,
    REAL_PRESETS,
    from_dict,
    load_config,
    merge,
    parse_override,
    read_config_file,
    split_config_args,
    to_dict,
)
from jobs.config.reference import field_docs, reference_markdown
from jobs.config.schema import (
    BACKENDS,
    MAX_BATCH,
    MAX_CROP,
    MAX_IMAGES_LOGGED,
    MAX_LOSS_WEIGHT,
    MAX_LR,
    MAX_PREFETCH,
    MAX_STEPS,
    MAX_TORCH_SEED,
    MAX_VAL_CROP,
    MAX_WORKERS,
    SCHEDULES,
    STAGES,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RealDegradationConfig,
    TrainConfig,
)

__all__ = [
    "BACKENDS", "MAX_BATCH", "MAX_CROP", "MAX_DEPTH", "MAX_FILE", "MAX_IMAGES_LOGGED", "MAX_LOSS_WEIGHT",
    "MAX_LR", "MAX_NODES", "MAX_OVERRIDE", "MAX_PREFETCH", "MAX_STEPS", "MAX_STRING", "MAX_TORCH_SEED",
    "MAX_VAL_CROP", "MAX_WORKERS", "PRESETS", "REAL_PRESETS", "SCHEDULES", "STAGES", "Config", "DataConfig",
    "LossConfig", "ModelConfig", "OptimConfig", "RealDegradationConfig", "TrainConfig", "check_inputs",
    "field_docs", "from_dict", "load_config", "merge", "parse_override", "read_config_file",
    "reference_markdown", "split_config_args", "to_dict", "validate",
]
