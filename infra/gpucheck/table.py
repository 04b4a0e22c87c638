"""The check's rows, its Markdown table, its exit code and the files it writes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

SUCCESS, UNAVAILABLE = "ok", "not available in this install"


@dataclass
class Row:
    """One line of the table."""

    step: str
    case: str
    figures: dict = field(default_factory=dict)
    """Name -> value (numbers are formatted by ``fmt``; strings are shown as they are)."""
    status: str = SUCCESS
    """``ok``, ``FAIL: why``, ``NOT RUN: why``, ``skipped: why`` or ``not available in this install``."""


def failed(reason: str) -> str:
    return f"FAIL: {reason}"


def is_failure(status: str) -> bool:
    """A path that failed, or one that should have run and did not."""
    return status.startswith(("FAIL", "NOT RUN"))


def exit_code(rows: list[Row]) -> int:
    return 1 if any(is_failure(r.status) for r in rows) else 0


def fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_table(title: str, rows: list[Row]) -> str:
    """The Markdown table: a title line, then one row per figure set."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", "| step | case | figures | result |", "|---|---|---|---|"]
    for r in rows:
        figures = " · ".join(f"{name} {fmt(value)}".strip() for name, value in r.figures.items())
        lines.append(f"| {cell(r.step)} | {cell(r.case)} | {cell(figures) or '-'} | {cell(r.status)} |")
    return "\n".join(lines) + "\n"


def write_results(out: str, table: str, title: str, rows: list[Row]) -> None:
    """The table at ``out`` (any fsspec URL) and the rows as JSON beside it."""
    from sr_core import storage

    def plain(value):  # standard JSON: inf and nan as strings
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value

    storage.write_bytes(out, table.encode())
    base = out[:-3] if out.endswith(".md") else out
    data = {"title": title, "rows": [{**asdict(r), "figures": {k: plain(v) for k, v in r.figures.items()}}
                                     for r in rows]}
    storage.write_bytes(base + ".json", (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())
