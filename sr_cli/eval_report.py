"""The tables of ``sr eval``: a terminal table, ``results.md``, ``results.csv``,
``per_image.csv`` and ``results.json``.

File names can hold any character, newlines included. CSV quotes them (the csv module
reads them back exactly), JSON escapes them, and the terminal and Markdown tables show
control characters as escapes (a newline as ``\\n``) so a row stays one line.
JSON is strict (no NaN or Infinity): an infinite PSNR (output identical to HR) is
``null`` with a note, and means say over how many images they were taken.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from sr_core.evaluate import METRICS, Method, MethodSummary, SetResult, summarize

HEADERS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mse": "MSE", "lpips": "LPIPS"}
DIGITS = {"psnr": 2, "ssim": 4, "mse": 2, "lpips": 4}
_MARKDOWN_SPECIAL = "\\`*_[]<>|#"


@dataclass
class Report:
    """Everything one ``sr eval`` run found."""

    scale: int
    crop_border: int
    y_channel: bool
    methods: list[Method]
    sets: list[SetResult] = field(default_factory=list)
    set_errors: list[tuple[str, str]] = field(default_factory=list)
    """(set argument, reason) of sets that could not be listed at all."""
    lpips: bool = False
    figures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """set name -> (file name below the output folder, caption)."""
    lr_chain: str = ""
    """How ``--degrade`` made the LR images (empty: MATLAB bicubic downscaling)."""

    @property
    def metrics(self) -> list[str]:
        return [m for m in METRICS if m != "lpips" or self.lpips]

    @property
    def channel(self) -> str:
        return "Y" if self.y_channel else "RGB"

    @property
    def num_failures(self) -> int:
        return len(self.set_errors) + sum(len(s.all_failures) for s in self.sets)


def visible(text: str) -> str:
    """``text`` on one line: backslashes doubled, control and other unprintable
    characters (newline, tab, undecodable bytes) as Python escapes."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


def markdown_cell(text: str) -> str:
    """``visible(text)`` with Markdown's special characters escaped, so it renders as itself."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in visible(text))


def _value(summary: MethodSummary, metric: str) -> float | None:
    return getattr(summary, metric)


def _best(summaries: dict[str, MethodSummary], metric: str) -> float | None:
    values = [v for s in summaries.values() if (v := _value(s, metric)) is not None]
    if not values:
        return None
    return max(values) if METRICS[metric] else min(values)


def _format(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{value:.{DIGITS[metric]}f}"


def protocol(report: Report) -> str:
    return (f"x{report.scale}; PSNR, SSIM and MSE on the {report.channel} channel"
            + (" (MATLAB BT.601)" if report.y_channel else "")
            + f" with {report.crop_border} border pixels cropped; MSE on the 0-255 scale")


def _psnr_note(summary: MethodSummary) -> str | None:
    if summary.psnr_images == summary.images:
        return None
    return (f"PSNR is infinite (output identical to HR) for {summary.images - summary.psnr_images} of "
            f"{summary.images} images; the mean is over the {summary.psnr_images} finite values")


# ---------------------------------------------------------------- terminal


def text_tables(report: Report) -> str:
    lines = [f"sr eval: {protocol(report)}"]
    width = max([len(visible(m.name)) for m in report.methods] + [8])
    for result in report.sets:
        image_set = result.image_set
        lines.append("")
        lines.append(f"{visible(image_set.name)}: {len(result.images)} image(s) scored from {visible(image_set.source)}"
                     + (f" with LR from {visible(image_set.lr_source)}" if image_set.lr_source else ""))
        if not result.images:
            continue
        lines.append(f"  {'method':<{width}}" + "".join(f" {HEADERS[m]:>10}" for m in report.metrics))
        for method in report.methods:
            summary = summarize(result, method.name)
            cells = "".join(f" {_format(_value(summary, m), m):>10}" for m in report.metrics)
            lines.append(f"  {visible(method.name):<{width}}{cells}")
            if note := _psnr_note(summary):
                lines.append(f"  {'':<{width}} ({note})")
    return "\n".join(lines)


def problem_lines(report: Report) -> list[str]:
    """One line per set or image that failed, was skipped or warned while decoding."""
    lines = [f"  FAILED set {visible(source)}: {visible(reason)}" for source, reason in report.set_errors]
    for result in report.sets:
        set_label = visible(result.image_set.name)
        lines += [f"  FAILED {set_label}/{visible(name)}: {visible(reason)}" for name, reason in result.all_failures]
        lines += [f"  skipped {set_label}/{visible(name)}: {visible(reason)}"
                  for name, reason in result.image_set.skipped]
        lines += [f"  warning {set_label}/{visible(name)}: {visible(message)}" for name, message in result.warnings]
    return lines


# ---------------------------------------------------------------- Markdown


def markdown(report: Report) -> str:
    out = ["# sr eval results", "",
           f"{protocol(report)}. Each row is the mean over the set's scored images; the best value of "
           "each column is in bold. "
           + (f"LR inputs are made from the HR images by: {report.lr_chain}." if report.lr_chain else
              "LR inputs are made from the HR images with MATLAB bicubic downscaling unless the set brings "
              "its own."), ""]
    for result in report.sets:
        image_set = result.image_set
        out.append(f"## {markdown_cell(image_set.name)}")
        out.append("")
        lr = f", LR images from {markdown_cell(image_set.lr_source)}" if image_set.lr_source else ""
        out.append(f"{len(result.images)} image(s) scored from {markdown_cell(image_set.source)}{lr}")
        out.append("")
        if result.images:
            summaries = {m.name: summarize(result, m.name) for m in report.methods}
            best = {metric: _best(summaries, metric) for metric in report.metrics}
            out.append("| method | " + " | ".join(HEADERS[m] for m in report.metrics) + " |")
            out.append("|---|" + "---:|" * len(report.metrics))
            notes = []
            for method in report.methods:
                summary = summaries[method.name]
                cells = []
                for metric in report.metrics:
                    text = _format(_value(summary, metric), metric)
                    value = _value(summary, metric)
                    # Bold what is best at the shown precision (ties are all bold).
                    if value is not None and text == _format(best[metric], metric):
                        text = f"**{text}**"
                    cells.append(text)
                out.append(f"| {markdown_cell(method.name)} | " + " | ".join(cells) + " |")
                if note := _psnr_note(summary):
                    notes.append(f"- {markdown_cell(method.name)}: {note}")
            out.append("")
            out += notes + ([""] if notes else [])
        for name, caption in report.figures.get(image_set.name, []):
            out += [f"![{markdown_cell(caption)}]({name})", ""]
        problems = ([f"- failed: {markdown_cell(n)} — {markdown_cell(r)}" for n, r in result.all_failures]
                    + [f"- skipped: {markdown_cell(n)} — {markdown_cell(r)}" for n, r in image_set.skipped])
        if problems:
            out += problems + [""]
    if report.set_errors:
        out += ["## Sets not scored", ""]
        out += [f"- {markdown_cell(s)}: {markdown_cell(r)}" for s, r in report.set_errors]
        out.append("")
    out += ["## Methods", ""]
    for method in report.methods:
        out.append(f"- **{markdown_cell(method.name)}**: {markdown_cell(method.definition)}")
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- CSV


def _csv(rows: list[list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    # Names that are not valid UTF-8 (possible on POSIX) are written with \x escapes.
    return buffer.getvalue().encode("utf-8", "backslashreplace")


def _csv_value(value: float | None) -> str | float:
    return "" if value is None else value  # inf is written as "inf", which CSV readers parse


def summary_csv(report: Report) -> bytes:
    rows = [["set", "method", "kind", "images", *report.metrics[:1], "psnr_images", *report.metrics[1:]]]
    for result in report.sets:
        for method in report.methods:
            s = summarize(result, method.name)
            values = [_csv_value(_value(s, m)) for m in report.metrics]
            rows.append([result.image_set.name, method.name, method.kind, s.images, values[0], s.psnr_images,
                         *values[1:]])
    return _csv(rows)


def per_image_csv(report: Report) -> bytes:
    rows = [["set", "image", "method", "width", "height", *report.metrics]]
    for result in report.sets:
        for image in result.images:
            for method in report.methods:
                score = image.scores[method.name]
                rows.append([result.image_set.name, image.name, method.name, image.width, image.height,
                             *[_csv_value(getattr(score, m)) for m in report.metrics]])
    return _csv(rows)


# ---------------------------------------------------------------- JSON


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def to_json(report: Report) -> dict:
    sets = []
    for result in report.sets:
        image_set = result.image_set
        summary = {}
        for method in report.methods:
            s = summarize(result, method.name)
            entry = {"images": s.images, "psnr_images": s.psnr_images,
                     **{m: _json_number(_value(s, m)) for m in report.metrics}}
            if note := _psnr_note(s):
                entry["note"] = note
            summary[method.name] = entry
        images = []
        for image in result.images:
            scores, notes = {}, []
            for method in report.methods:
                score = image.scores[method.name]
                scores[method.name] = {m: _json_number(getattr(score, m)) for m in report.metrics}
                if math.isinf(score.psnr):
                    notes.append(f"{method.name}: output identical to HR, PSNR is infinite (null)")
            images.append({"name": image.name, "width": image.width, "height": image.height, "scores": scores,
                           **({"notes": notes} if notes else {})})
        sets.append({
            "name": image_set.name, "source": image_set.source, "lr_source": image_set.lr_source,
            "summary": summary, "images": images,
            "failures": [{"name": n, "reason": r} for n, r in result.all_failures],
            "skipped": [{"name": n, "reason": r} for n, r in image_set.skipped],
            "figures": [name for name, _ in report.figures.get(image_set.name, [])],
        })
    return {
        "scale": report.scale, "channel": report.channel, "crop_border": report.crop_border,
        **({"lr_chain": report.lr_chain} if report.lr_chain else {}),
        "methods": [{"name": m.name, "kind": m.kind, "definition": m.definition} for m in report.methods],
        "sets": sets,
        "set_errors": [{"input": s, "reason": r} for s, r in report.set_errors],
        "notes": ["image names are relative to their set; PSNR is null where the output is identical to HR "
                  "(infinite PSNR), and set means of PSNR are over the finite values (psnr_images says how many)"],
    }


def json_bytes(report: Report) -> bytes:
    # allow_nan=False: a NaN or Infinity that slipped through is our bug, not invalid JSON.
    return json.dumps(to_json(report), indent=2, allow_nan=False).encode("ascii")
