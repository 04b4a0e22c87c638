"""Reading a config: a preset, then a YAML or JSON file, then ``section.field=value``
overrides, merged by the schema's types, built and checked (``jobs.config.typed``) and
validated across fields (``jobs.config.checks``). Text from files and command lines is
bounded before it is parsed or walked: nesting, size, count of values."""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from typing import Any

from jobs.config.checks import validate
from jobs.config.schema import Config
from jobs.config.typed import build
from sr_core.errors import MAX_SHOWN, shown

MAX_DEPTH = 32
"""Deepest nesting of lists and mappings in a config file or an override value. Real
configs nest three levels (section, field, a mapping or list); a value nested
thousands deep is built to exhaust the parser's stack."""

MAX_NODES = 1_000_000
"""Most values and keys (counted through YAML aliases) in a config file or an override;
real configs have about a hundred, and aliases can make a small file describe billions."""

MAX_STRING = 4096
"""Longest string a config value may be (URLs and paths are far shorter)."""

MAX_FILE = 16 << 20
"""Largest config file read (bytes): a config is a few kilobytes; YAML reads about a
megabyte a second."""

MAX_OVERRIDE = 1 << 16
"""Longest ``section.field=value`` override read (characters)."""


def _check_parsed(value: Any, where: str) -> Any:
    """``value`` as parsed from a file or an override, refused when it nests deeper than
    ``MAX_DEPTH``, holds more than ``MAX_NODES`` values or a string longer than
    ``MAX_STRING`` (walked without recursion)."""
    stack, nodes = [(value, 0, where)], 0
    while stack:
        item, depth, name = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ValueError(f"{where}: more than {MAX_NODES} values and keys (YAML aliases expanding?); a "
                             "config has about a hundred")
        if depth > MAX_DEPTH:
            raise ValueError(f"{name}: nested more than {MAX_DEPTH} levels deep; a config nests three")
        if isinstance(item, str) and len(item) > MAX_STRING:
            raise ValueError(f"{name}: a value of {len(item)} characters; config values are at most {MAX_STRING}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1, f"{name}.{str(k)[:80]}") for k, v in item.items())
            stack.extend((k, depth + 1, f"{name} key") for k in item)
        elif isinstance(item, list):
            stack.extend((v, depth + 1, f"{name}[{i}]") for i, v in enumerate(item))
    return value


def _load_text(load, data, what: str, syntax_error: type[Exception], language: str):
    """``load(data)`` (a YAML or JSON parser), every way the text can fail turned into one
    ValueError naming ``what``: a syntax error, nesting past Python's stack, an integer
    past Python's 4300-digit limit."""
    try:
        return load(data)
    except RecursionError:
        raise ValueError(f"{what}: nested too deeply to parse (configs nest three levels)") from None
    except syntax_error as exc:
        raise ValueError(f"{what}: not valid {language} ({' '.join(str(exc).split())[:MAX_SHOWN]})") from None
    except ValueError as exc:  # int() of a number past 4300 digits; the advice after ';' is Python's
        raise ValueError(f"{what}: {str(exc).split(';')[0][:MAX_SHOWN]}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.gt_size=128"`` -> ``("data.gt_size", 128)``; the value is read as YAML
    (so ``true``, ``0.5``, ``[a, b]`` and ``{jpeg: 0.3}`` mean what they say)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {shown(text)} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if len(key) > MAX_SHOWN:
        raise ValueError(f"override key {shown(key)}: no config field has a name that long")
    if len(raw) > MAX_OVERRIDE:
        raise ValueError(f"override {key}: a value of {len(raw)} characters; config values are at most {MAX_STRING}")
    value = _load_text(yaml.safe_load, raw, f"override {key}", yaml.YAMLError, "YAML") if raw.strip() else ""
    return key, _check_parsed(value, key)


def parse_config_text(data: bytes | str, path: str) -> dict[str, Any]:
    """The mapping in a config file's text (JSON when ``path`` ends in ``.json``, else YAML)."""
    import json

    import yaml

    if path.lower().endswith(".json"):
        loaded = _load_text(json.loads, data, path, json.JSONDecodeError, "JSON")
    else:
        loaded = _load_text(yaml.safe_load, data, path, yaml.YAMLError, "YAML") or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    _check_parsed(loaded, path)
    return loaded


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON (``.json``) file, any fsspec URL."""
    from sr_core import storage

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    if len(data) > MAX_FILE:
        raise ValueError(f"{path}: {len(data)} bytes; a config file is a few kilobytes (at most {MAX_FILE})")
    return parse_config_text(data, path)


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] section.field=value ...`` (what ``sr train`` and ``python -m jobs.train``
    take) -> (the config file or None, the overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" not in item and i == 0:
            path = item
        elif "=" not in item:
            raise ValueError(f"{shown(item)}: expected section.field=value (only the first argument may be a config file)")
        else:
            overrides.append(item)
    return path, overrides


def _nest(flat: dict[str, Any], name_for_errors: str) -> dict[str, Any]:
    """``{"data.gt_size": 64}`` -> ``{"data": {"gt_size": 64}}``."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ValueError(f"{name_for_errors}: malformed key {shown(dotted)}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name_for_errors}: {shown(dotted)} sets a field inside a non-section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any], cls: type = Config) -> dict[str, Any]:
    """``update`` over ``base`` for dataclass ``cls``: a section (a dataclass-typed field)
    is merged field by field; every other value, mappings and lists included, is replaced
    whole (a file's ``degradation_probs: {jpeg: 0.3}`` means exactly that mapping)."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in update.items():
        hint = hints.get(key)  # unknown keys pass through: build() names them
        if (hint is not None and dataclasses.is_dataclass(hint) and isinstance(value, dict)
                and isinstance(out.get(key), dict)):
            out[key] = merge(out[key], value, hint)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- presets

PRESET_FOLDER = "presets"
"""The presets are YAML files shipped in this package: ``jobs/config/presets/NAME.yaml``."""

EXTENDS = "extends"
"""A preset's top-level key naming the preset it starts from (its values go over those)."""


def _preset_files() -> dict[str, Any]:
    folder = resources.files("jobs.config") / PRESET_FOLDER
    return {entry.name.removesuffix(".yaml"): entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def _read_presets() -> dict[str, dict[str, Any]]:
    """Every preset as a mapping of sections, its ``extends`` chain resolved."""
    raw = {name: parse_config_text(entry.read_text(encoding="utf-8"), f"preset {name}")
           for name, entry in sorted(_preset_files().items())}

    def resolved(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
        values = dict(raw[name])
        parent = values.pop(EXTENDS, None)
        if parent is None:
            return values
        if parent not in raw or parent in seen:
            raise AssertionError(f"preset {name}: extends {parent!r}, which is unknown or a cycle")
        return merge(resolved(parent, (*seen, name)), values)

    return {name: resolved(name, (name,)) for name in raw}


PRESETS: dict[str, dict[str, Any]] = _read_presets()
"""Starting values of ``sr train --preset NAME``: name -> mapping of sections (the
``default`` preset is empty: the schema's defaults)."""

REAL_PRESETS: dict[str, dict[str, Any]] = {
    name: values for name, values in PRESETS.items() if values.get("degradation", {}).get("enabled")}
"""The presets that train on Real-ESRGAN's second-order degradation."""


# ---------------------------------------------------------------- building


def load_config(path: str | None = None, overrides: list[str] = (), preset: str = "default") -> Config:
    """Build the config from ``preset``, then the YAML or JSON file at ``path`` (any
    fsspec URL), then ``overrides`` (``section.field=value`` strings)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {shown(preset)}; known: {', '.join(sorted(PRESETS))}")
    values = merge({}, PRESETS[preset])
    if path:
        values = merge(values, read_config_file(path))
    values = merge(values, _nest(dict(parse_override(o) for o in overrides), "overrides"))
    return from_dict(values)


def to_dict(config: Config) -> dict[str, Any]:
    """A config as plain YAML/JSON-safe data (tuples become lists); :func:`from_dict` reads it back."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def from_dict(values: dict[str, Any]) -> Config:
    """A validated config from plain data (the inverse of :func:`to_dict`)."""
    config = build(Config, values)
    validate(config)
    return config
