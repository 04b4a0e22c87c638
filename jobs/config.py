"""Typed configuration for the training job.

Each section is a dataclass whose fields carry their documentation as a docstring
right below them (read back by :func:`field_docs`). A config is built from a preset,
then a YAML file, then dotted overrides from the command line (``data.gt_size=128``),
in that order. An unknown key or a value of the wrong type is a ``ValueError`` that
names the field; nothing is silently defaulted.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass
class DataConfig:
    """Where training crops come from and how they are made."""

    train_shards: str = ""
    """Prefix written by ``sr prepare`` (holds ``index.json`` and the shards), any fsspec
    URL. Leave empty when training from paired folders (``train_hr`` + ``train_lr``)."""

    train_hr: str = ""
    """Folder or prefix of HR images for paired training (with ``train_lr``)."""

    train_lr: str = ""
    """Folder or prefix of LR images matching ``train_hr`` by name (DIV2K layout:
    ``X4/0001x4.png`` beside ``0001.png``; ``0001.png`` also matches)."""

    gt_size: int = 128
    """Side of the HR (ground-truth) crop in pixels; must be a multiple of ``scale``."""

    scale: int = 4
    """Upscaling factor: LR crops are ``gt_size / scale`` pixels."""

    batch_size: int = 16
    """Crops per batch on each rank (the global batch is this times the world size)."""

    num_workers: int = 4
    """DataLoader worker processes per rank (0 reads in the training process)."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead of the training loop."""

    samples_per_transfer: int = 32
    """Workers hand batches to the training process in groups of at least this many
    samples: each hand-over costs the training loop about a millisecond whatever its size,
    which matters only for small models (the crops and their order do not change)."""

    seed: int = 0
    """Seed of shard order, sample order, crops and augmentations: the stream of crops is
    a function of (seed, epoch, rank, world size)."""

    shuffle_window_shards: int = 4
    """Samples are shuffled within windows of this many consecutive shards of a rank, so
    a worker reads a few shards at a time instead of all of them at once."""

    hflip_prob: float = 0.5
    """Probability of a horizontal flip (applied to LR and HR alike)."""

    vflip_prob: float = 0.5
    """Probability of a vertical flip (applied to LR and HR alike)."""

    transpose_prob: float = 0.5
    """Probability of swapping height and width; with both flips this gives all eight
    rotations/reflections (rot90 = transpose + flip)."""

    degradation_probs: dict[str, float] = field(default_factory=dict)
    """Probability of each LR-only degradation from ``sr_core.degradations`` (``jpeg``,
    ``gaussian_noise``, ``gaussian_blur``, ``coarse_dropout``); empty means the LR is
    plain bicubic, the published convention."""

    cache_dir: str = ""
    """Local folder where shards read from remote storage are cached (shared by the
    DataLoader workers). Empty means ``~/.cache/sr-cloud/shards``."""

    cache_max_gb: float = 50.0
    """Size limit of the shard cache; least recently used shards are evicted beyond it."""

    val_folder: str = ""
    """Folder or prefix of HR validation images (Set5/Set14/BSD100/DIV2K-valid layouts:
    just the HR images); LR is made by bicubic downscaling. Empty means no validation."""

    val_center_crop: int = 0
    """Validate on centre crops of this size (0: whole images, cropped to a multiple of
    ``scale``)."""


@dataclass
class Config:
    """The training job's configuration (later issues add model, optimizer, train)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""


# Presets are plain override dicts applied before the YAML file; "tiny" runs on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "data.gt_size": 64,
        "data.scale": 2,
        "data.batch_size": 4,
        "data.num_workers": 2,
        "data.cache_max_gb": 1.0,
    },
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _check_value(value: Any, hint: Any, name: str) -> Any:
    """Return ``value`` converted to ``hint`` when that is lossless (int -> float),
    else raise ``ValueError`` naming the field."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{name}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{name}: expected null, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, name + ".")
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return {_check_value(k, key_type, f"{name} key"): _check_value(v, value_type, f"{name}.{k}")
                for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_check_value(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ValueError(f"{name}: expected {hint.__name__}, got {value!r}")
        return value
    raise AssertionError(f"config field {name} has an unsupported type {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"{cls.__name__} has: {', '.join(sorted(known))}")
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _nest(flat: dict[str, Any], name_for_errors: str) -> dict[str, Any]:
    """``{"data.gt_size": 64}`` -> ``{"data": {"gt_size": 64}}``."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ValueError(f"{name_for_errors}: malformed key {dotted!r}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name_for_errors}: {dotted!r} sets a field inside a non-section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "degradation_probs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.gt_size=128"`` -> ``("data.gt_size", 128)``; the value is read as YAML
    (so ``true``, ``0.5``, ``[a, b]`` and ``{jpeg: 0.3}`` mean what they say)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[str] = (), preset: str = "default",
                cls: type = Config):
    """Build ``cls`` from ``preset``, then the YAML file at ``path`` (any fsspec URL),
    then ``overrides`` (``section.field=value`` strings)."""
    import yaml

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    values = _nest(PRESETS[preset], f"preset {preset}")
    if path:
        from sr_core import storage

        try:
            loaded = yaml.safe_load(storage.read_bytes(path)) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        values = _merge(values, loaded)
    values = _merge(values, _nest(dict(parse_override(o) for o in overrides), "overrides"))
    config = _build(cls, values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that involve several fields or value ranges."""
    d = config.data
    if d.scale < 1:
        raise ValueError(f"data.scale must be >= 1, got {d.scale}")
    if d.gt_size <= 0 or d.gt_size % d.scale:
        raise ValueError(f"data.gt_size ({d.gt_size}) must be a positive multiple of data.scale ({d.scale})")
    if d.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {d.batch_size}")
    if d.samples_per_transfer < 1:
        raise ValueError(f"data.samples_per_transfer must be >= 1, got {d.samples_per_transfer}")
    if d.seed < 0:
        raise ValueError(f"data.seed must be >= 0 (numpy seeds are non-negative), got {d.seed}")
    if d.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {d.num_workers}")
    for name in ("hflip_prob", "vflip_prob", "transpose_prob"):
        p = getattr(d, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.{name} must be in [0, 1], got {p}")
    from sr_core.degradations import PROBABILITY_FIELDS

    unknown = sorted(set(d.degradation_probs) - set(PROBABILITY_FIELDS))
    if unknown:
        raise ValueError(f"data.degradation_probs: unknown degradation(s) {unknown}; "
                         f"known: {', '.join(PROBABILITY_FIELDS)}")
    for name, p in d.degradation_probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.degradation_probs.{name} must be in [0, 1], got {p}")
    if d.train_shards and (d.train_hr or d.train_lr):
        raise ValueError("set either data.train_shards or data.train_hr + data.train_lr, not both")
    if bool(d.train_hr) != bool(d.train_lr):
        raise ValueError("paired training needs both data.train_hr and data.train_lr")
