"""``sr eval``: compare models and interpolation baselines on sets of HR images, with
the SR papers' conventions, and write tables and figures a person can read.

Each HR argument is a set (a folder or prefix searched recursively, one image, or a
``.txt`` file listing images); ``--paired HR LR`` is a set that brings its own LR
images. Bad inputs (missing sets, unreadable images, LR images of the wrong size,
links out of a folder) are reported with their reason and the rest is scored; the exit
code is then 1. Hidden files are reported as skipped.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import sys

DEFAULT_BASELINES = "nearest,bicubic"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare models and interpolation baselines on HR image sets: PSNR/SSIM/MSE tables and figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "For each HR image: crop to a multiple of the scale, make the LR input with MATLAB-bicubic\n"
            "downscaling (or take the set's own LR image, --paired), upscale it with every model and\n"
            "baseline, and report PSNR/SSIM/MSE on the Y channel (BT.601) with the border of `scale`\n"
            "pixels cropped: the conventions of published tables (bicubic x4 on Set5: 28.42 dB).\n\n"
            "Prints one table per set. With --out it also writes results.md (best in bold), results.csv,\n"
            "results.json, per_image.csv and figures/: a bar chart per set and crop grids of the images\n"
            "where the first model gains most and least over bicubic. Sets and OUT may be fsspec URLs\n"
            "(gs://). Bad images and sets are reported and the rest is scored (exit code 1)."
        ),
        epilog=(
            "baselines:\n"
            "  bicubic                    MATLAB imresize bicubic (sr_core.resize), the papers' convention\n"
            "  nearest, bilinear, lanczos Pillow's Image.resize filters on the 8-bit image\n\n"
            "examples:\n"
            "  sr eval Set5/ Set14/ --model x4.safetensors --out eval/\n"
            "  sr eval Set5/ --model psnr.safetensors --model gan.safetensors --baseline all --out eval/\n"
            "  sr eval Set5/ --bicubic 4\n"
            "  sr eval --paired DIV2K_valid_HR DIV2K_valid_LR_bicubic/X4 --model x4.safetensors\n"
            "  sr eval gs://bucket/Set14 --model gs://bucket/x4.safetensors --out gs://bucket/eval/"
        ),
    )
    p.add_argument("inputs", nargs="*", metavar="HR",
                   help="a set of HR images: a folder or prefix (recursive), one image, or a .txt file listing "
                        "images one per line (paths or fsspec URLs)")
    p.add_argument("--paired", nargs=2, action="append", default=[], metavar=("HR", "LR"),
                   help="a set with its own LR images: HR folder and LR folder, matched by relative path and "
                        "stem (DIV2K's 0801x4.png naming too); repeat for several")
    p.add_argument("-m", "--model", action="append", default=[],
                   help="generator file to score (path or URL); repeat for several models. A multi-head model "
                        "reports every head and the head mean")
    p.add_argument("--baseline", default=DEFAULT_BASELINES,
                   help="comma-separated interpolation baselines from nearest,bilinear,bicubic,lanczos, or 'all' "
                        f"(default: {DEFAULT_BASELINES}); bicubic is always included, gains are measured against it")
    p.add_argument("-s", "--scale", type=int, default=None,
                   help="the scale to score at (default: the models' scale; models of different scales need it: "
                        "each model's output is then resized to it with MATLAB bicubic)")
    p.add_argument("--bicubic", type=int, metavar="SCALE", default=None,
                   help="shorthand for --scale SCALE --baseline bicubic (the published baseline)")
    p.add_argument("--degrade", metavar="SPEC", default=None,
                   help="score on a degraded copy of the sets: HR -> Gaussian blur (blur=SIGMA, HR px) -> MATLAB "
                        "bicubic downscale -> Gaussian noise (noise=SIGMA on 0..255) -> Pillow JPEG "
                        "(jpeg=QUALITY), in that order, any subset, e.g. blur=1.2,noise=5,jpeg=60; the noise is "
                        "seeded per image by its name, so runs agree (not with --paired)")
    p.add_argument("--rgb", action="store_true", help="score on RGB instead of the Y channel")
    p.add_argument("--crop-border", type=int, default=None, help="pixels cropped at each edge (default: the scale)")
    p.add_argument("-o", "--out", metavar="DIR", default=None,
                   help="write results.md, results.csv, results.json, per_image.csv and figures/ here "
                        "(folder path or fsspec URL)")
    p.add_argument("--figures", type=int, default=3, metavar="N",
                   help="with --out: crop figures of the N images where the first model gains most over bicubic "
                        "and of the N where it gains least, per set (default: 3; 0: only the bar charts)")
    p.add_argument("--json", dest="json_out", default=None, help="also write results.json to this file")
    p.add_argument("--lpips", action="store_true",
                   help="also report LPIPS (needs the optional `lpips` package and its AlexNet weights on disk)")
    p.add_argument("--tile", type=int, default=None, help="tile size for the models (0: untiled; default: automatic)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    p.set_defaults(func=run_eval)


def parse_baselines(text: str, bicubic_only: bool) -> list[str]:
    from sr_core.evaluate import BASELINE_NAMES, REFERENCE

    if bicubic_only:
        return [REFERENCE]
    wanted = set(BASELINE_NAMES) if text.strip() == "all" else {b.strip() for b in text.split(",") if b.strip()}
    unknown = sorted(wanted - set(BASELINE_NAMES))
    if unknown:
        raise ValueError(f"--baseline: unknown {', '.join(unknown)}; choose from {','.join(BASELINE_NAMES)} or all")
    wanted.add(REFERENCE)
    return [b for b in BASELINE_NAMES if b in wanted]


def model_labels(urls: list[str]) -> list[str]:
    """Table names of the models: their file names, or the whole URL where two share one."""
    if len(set(urls)) != len(urls):
        raise ValueError("--model: the same file is given twice")
    names = [posixpath.basename(u.rstrip("/")) or u for u in urls]
    return [n if names.count(n) == 1 else u for n, u in zip(names, urls)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "x"


def run_eval(args: argparse.Namespace) -> int:
    from sr_core.progress import bar as progress_bar

    from sr_cli import eval_report
    from sr_core import evaluate, modelfile, storage

    scale, degrade = _checked_scale_and_degradation(args)
    baselines = parse_baselines(args.baseline, args.bicubic is not None)
    labels = model_labels(args.model)
    models = [modelfile.load_generator(url) for url in args.model]
    if scale is None:
        scale = _models_scale(models, labels)
    out = args.out
    if out is not None:
        storage.check_writable(out)
    methods = [evaluate.baseline(name, scale) for name in baselines]
    for label, model in zip(labels, models):
        methods += evaluate.model_methods(model, label, scale, device=args.device, tile=args.tile)
    lpips = evaluate.load_lpips("cpu" if args.device == "auto" else args.device) if args.lpips else None

    crop_border = scale if args.crop_border is None else args.crop_border
    report = eval_report.Report(scale=scale, crop_border=crop_border, y_channel=not args.rgb, methods=methods,
                                lpips=lpips is not None, lr_chain=degrade.describe() if degrade else "")
    listed = _list_sets(args, scale, report)

    bar = progress_bar(sum(len(s.items) for s in listed) * len(methods), "eval", "run")
    for image_set in listed:
        bar.set_description(f"eval {eval_report.visible(image_set.name)[:30]}", refresh=False)
        report.sets.append(evaluate.evaluate_set(image_set, methods, scale, crop_border, not args.rgb, lpips,
                                                 on_method=lambda: bar.update(1), degrade=degrade))
    bar.close()

    if out is not None:
        _write_figures(report, out, args.figures, degrade)
        for name, data in (("results.md", eval_report.markdown(report).encode("utf-8", "backslashreplace")),
                           ("results.csv", eval_report.summary_csv(report)),
                           ("per_image.csv", eval_report.per_image_csv(report)),
                           ("results.json", eval_report.json_bytes(report))):
            storage.write_bytes(storage.join(out, name), data)
    if args.json_out:
        storage.write_bytes(args.json_out, eval_report.json_bytes(report))

    if degrade is not None:
        print(f"LR images: {degrade.describe()}")
    print(eval_report.text_tables(report))
    problems = eval_report.problem_lines(report)
    scored = sum(len(s.images) for s in report.sets)
    skipped = sum(len(s.image_set.skipped) for s in report.sets)
    print(f"\nsr eval: scored {scored} image(s) in {len(report.sets)} set(s); failed {report.num_failures}, "
          f"skipped {skipped}" + (f"; tables and figures in {out}" if out else ""))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if report.num_failures else 0


def _checked_scale_and_degradation(args: argparse.Namespace):
    """The scale the options set (None: the models') and the LR degradation of --degrade."""
    if not args.inputs and not args.paired:
        raise ValueError("give at least one HR set (a folder, prefix, image or .txt list) or --paired HR LR")
    if args.figures < 0:
        raise ValueError(f"--figures must be 0 or more, got {args.figures}")
    if args.crop_border is not None and args.crop_border < 0:
        raise ValueError(f"--crop-border must be 0 or more, got {args.crop_border}")
    scale = args.scale
    if args.bicubic is not None:
        if scale is not None and scale != args.bicubic:
            raise ValueError(f"--bicubic {args.bicubic} and --scale {scale} disagree; give one of them")
        scale = args.bicubic
    if scale is not None and scale < 1:
        raise ValueError(f"the scale must be 1 or more, got {scale}")
    degrade = None
    if args.degrade is not None:
        from sr_core.degradations import parse_eval_degradation

        if args.paired:
            raise ValueError("--degrade makes the LR images from the HR ones; --paired sets bring their own: "
                             "give one or the other")
        degrade = parse_eval_degradation(args.degrade)
    return scale, degrade


def _models_scale(models: list, labels: list[str]) -> int:
    """The one scale of the models (no --scale given)."""
    if not models:
        raise ValueError("nothing sets the scale: give --model M, or --scale S (or --bicubic S) to score "
                         "baselines only")
    scales = {int(m.scale) for m in models}
    if len(scales) > 1:
        found = ", ".join(f"{label} x{m.scale}" for label, m in zip(labels, models))
        raise ValueError(f"the models have different scales ({found}); pass --scale S to score them all at "
                         "S (each model's output is then resized to S with MATLAB bicubic)")
    return scales.pop()


def _list_sets(args: argparse.Namespace, scale: int, report) -> list:
    """The image sets of the arguments, uniquely named; a set that cannot be listed goes
    to ``report.set_errors`` and the others are scored."""
    from sr_core import evaluate
    from sr_core.errors import strip_url

    listed = []
    used_names: set[str] = set()
    for source, lr_source in [(s, None) for s in args.inputs] + [tuple(p) for p in args.paired]:
        try:
            image_set = evaluate.list_set(source, lr_source, scale)
        except (FileNotFoundError, ValueError, OSError) as exc:  # one bad set is reported, the rest scored
            report.set_errors.append((source, strip_url(exc, source)))
            continue
        base, n = image_set.name, 1
        while image_set.name in used_names:  # two sets named alike (a/Set5, b/Set5)
            n += 1
            image_set.name = f"{base} ({n})"
        used_names.add(image_set.name)
        listed.append(image_set)
    return listed


def _write_figures(report, out: str, count: int, degrade=None) -> None:
    from sr_cli import eval_figures
    from sr_cli import eval_report
    from sr_core import evaluate, storage

    primary = next((m for m in report.methods if m.kind == "model" and m.primary), None)
    slugs: set[str] = set()
    for result in report.sets:
        if not result.images:
            continue
        name = result.image_set.name
        slug = _slug(name)
        while slug in slugs:
            slug += "_"
        slugs.add(slug)
        figures = report.figures.setdefault(name, [])
        rows = []
        for method in report.methods:
            summary = evaluate.summarize(result, method.name)
            rows.append((method.name, method.kind, summary.psnr, summary.ssim))
        n = len(result.images)
        chart = eval_figures.bar_chart(f"{name}: means over {n} image{'s' if n != 1 else ''}",
                                       f"x{report.scale}, {report.channel} channel, {report.crop_border} border "
                                       "pixels cropped", rows)
        file = f"figures/{slug}-bars.png"
        storage.write_bytes(storage.join(out, file), eval_figures.png_bytes(chart))
        figures.append((file, f"{name}: mean PSNR and SSIM per method"))
        if primary is None or count == 0:
            continue
        items = {item.name: item for item in result.image_set.items}
        scores = {image.name: image.scores for image in result.images}
        gains = dict((n, g) for g, n in evaluate.gains_over_reference(result, primary.name))
        for image_name, kind, rank in evaluate.figure_images(result, primary.name, count):
            try:
                hr, outputs = result.kept.get(image_name) or evaluate.run_methods(items[image_name], report.methods,
                                                                                  report.scale, degrade)
            except Exception as exc:  # it was scored a moment ago; say so rather than lose the tables
                result.failures.append((image_name, f"figure: {evaluate.failure_reason(exc, items[image_name])}"))
                continue
            side = eval_figures.crop_side(*hr.shape[:2])
            corner = eval_figures.choose_crop(list(outputs.values()), side)
            panels = [(m.name, outputs[m.name], scores[image_name][m.name].psnr, scores[image_name][m.name].ssim)
                      for m in report.methods] + [("HR", hr, float("nan"), float("nan"))]
            shown = eval_report.visible(f"{name}/{image_name}")
            gain = gains[image_name]
            title = (f"{shown}, x{report.scale}: {primary.name} vs bicubic {gain:+.2f} dB PSNR "
                     f"({'largest' if kind == 'most' else 'smallest'} gain #{rank} of {len(gains)} images)")
            grid = eval_figures.crop_grid(title, hr, panels, corner, side)
            file = f"figures/{slug}-{kind}{rank}-{_slug(posixpath.splitext(image_name)[0])}.png"
            storage.write_bytes(storage.join(out, file), eval_figures.png_bytes(grid))
            figures.append((file, title))

