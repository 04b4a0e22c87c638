"""The config reference (docs/TRAINING.md) generated from the schema: each field's name,
type, default and the docstring written below it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from jobs.config.schema import Config


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


def reference_markdown() -> str:
    """The config reference (every section's fields, types, defaults and docstrings) as
    Markdown, for docs/TRAINING.md: ``python -m jobs.config``."""
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"### `{section.name}`: {' '.join((cls.__doc__ or '').split())}", "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        lines += _reference_rows(cls, getattr(defaults, section.name), section.name)
        lines.append("")
    return "\n".join(lines)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        # A choice reads as its choices: psnr / gan.
        return " / ".join(str(choice) for choice in typing.get_args(hint))
    name = getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")
    return str(name).replace("|", "or")


def _reference_rows(cls: type, values, prefix: str) -> list[str]:
    """One table row per field of dataclass ``cls``; a nested section (a dataclass-typed
    field, e.g. ``degradation.first``) gives one row per field of its own."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value, hint = getattr(values, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += _reference_rows(hint, value, f"{prefix}.{f.name}")
            continue
        default = repr(list(value) if isinstance(value, tuple) else value).replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | {_type_name(hint)} | `{default}` | "
                    f"{docs.get(f.name, '').replace('|', '/')} |")
    return rows
