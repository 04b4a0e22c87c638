"""Does the recipe learn, and which generator gets past bicubic on a CPU? The compact
generator (`srvgg_compact` `small`: 32 features, 8 convolutions) and RRDBNet (`rrdbnet`
`small`: 16 features, 2 blocks), both x2, trained side by side by `sr train` with one
recipe (the demo_x2 preset's PSNR stage: L1, Adam 1e-3, batch 16) on the same shards of the sample photographs in assets/images for the same minutes,
validated on other photographs (scikit-image's rocket and motorcycle). Prints each curve
as a table, the step and minute at which each passes bicubic (or "not within the cap"),
and draws both into one PNG with the bicubic line.

    .venv/bin/python bench/bench_learning_curve.py [--minutes 15] [--png docs/learning_curve_x2.png]

Both runs go at once, each a process with one torch thread and its data read in-process,
so on a 2-core machine each has a core and both see the same load from other work. The
time cap is enforced the way a spot VM ends a run: SIGTERM, after which the job writes a
checkpoint and exits 0 (so a run can also be continued with --resume auto).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


# name -> (sr train arguments beyond the shared ones, plot colour). One recipe, the
# demo_x2 preset's (L1, Adam 1e-3 betas (0.9, 0.99), batch 16), only the generator differs.
MODELS = {
    "compact small": (["--preset", "demo_x2"], (0, 70, 200)),
    "RRDBNet small": (["--preset", "demo_x2", "model.generator=rrdbnet", "model.generator_variant=small"],
                      (0, 150, 60)),
}


def validation_folder(folder: str) -> None:
    """Photographs not in the training set: scikit-image's rocket and motorcycle."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    os.makedirs(folder, exist_ok=True)
    for name in ("rocket.jpg", "motorcycle_left.png"):
        Image.open(data / name).convert("RGB").save(os.path.join(folder, Path(name).stem + ".png"))


def read_curve(tb_dir: str) -> tuple[list[tuple[int, float, float]], float | None]:
    """[(step, wall time, val PSNR)], bicubic PSNR."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(tb_dir):
        return [], None
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "val/psnr" not in acc.Tags()["scalars"]:
        return [], None
    curve = [(e.step, e.wall_time, e.value) for e in acc.Scalars("val/psnr")]
    return curve, acc.Scalars("val/psnr_bicubic")[0].value


def plot(curves: dict[str, list[tuple[float, float]]], bicubic: float, path: str, title: str) -> None:
    """Line charts of (minutes, PSNR) with the bicubic level, drawn with Pillow."""
    width, height, left, right, top, bottom = 900, 520, 70, 20, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points_all = [pt for curve in curves.values() for pt in curve]
    x_max = max([m for m, _ in points_all] + [1e-3])
    ys = [p for _, p in points_all] + [bicubic]
    y_min, y_max = min(ys) - 0.5, max(ys) + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (width - left - right) * x / x_max,
                height - bottom - (height - top - bottom) * (y - y_min) / (y_max - y_min))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        y = y_min + (y_max - y_min) * i / 5
        _, py = to_px(0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((5, py - 6), f"{y:.1f} dB", fill="black")
        x = x_max * i / 5
        px, _ = to_px(x, y_min)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{x:.1f}", fill="black")
    draw.text((width // 2 - 40, height - 25), "minutes", fill="black")
    draw.text((left, 10), title, fill="black")
    _, by = to_px(0, bicubic)
    for x in range(left, width - right, 12):  # dashed bicubic line
        draw.line([x, by, x + 6, by], fill=(200, 0, 0), width=2)
    draw.text((width - right - 230, by - 18), f"bicubic {bicubic:.2f} dB", fill=(200, 0, 0))
    for row, (name, curve) in enumerate(curves.items()):
        colour = MODELS[name][1]
        points = [to_px(m, p) for m, p in curve]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((left + 10, top + 10 + 16 * row), f"{name} x2, validation PSNR-Y", fill=colour)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def passing_point(rows: list[tuple[int, float, float]], bicubic: float) -> str:
    """The first validation above bicubic, as 'step S (M min)', or 'not within the cap'."""
    for step, minutes, psnr in rows:
        if psnr > bicubic:
            return f"step {step} ({minutes:.1f} min)"
    return "not within the cap"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="time cap of both runs (default: 15)")
    parser.add_argument("--val-every", type=int, default=250, help="steps between validations (default: 250)")
    parser.add_argument("--png", default=str(REPO / "docs" / "learning_curve_x2.png"))
    parser.add_argument("--work", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench-curve-")
    from jobs.prepare import PrepareSettings, prepare

    shards, val = os.path.join(work, "shards"), os.path.join(work, "val")
    if not os.path.exists(os.path.join(shards, "index.json")):
        prepare(str(REPO / "assets" / "images"), shards, PrepareSettings(size=128, step=64, format="raw"),
                progress=False)
    validation_folder(val)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes, run_dirs = {}, {}
    start = time.time()
    for name, (overrides, _) in MODELS.items():
        run_dirs[name] = os.path.join(work, "run-" + name.split()[0].lower())
        shutil.rmtree(run_dirs[name], ignore_errors=True)
        command = [sys.executable, "-m", "jobs.train", *overrides, f"data.train_shards={shards}",
                   f"data.val_folder={val}", f"train.run_dir={run_dirs[name]}", "data.scale=2", "data.gt_size=64",
                   "data.num_workers=0", "train.max_steps=100000000", f"train.val_every={args.val_every}",
                   "train.checkpoint_every=100000", "train.log_every=50", "train.ema_decay=0.99",
                   "train.num_val_images_logged=0", "train.progress=false", "train.sync_tensorboard_seconds=10"]
        print("$ " + " ".join(command), file=sys.stderr)
        processes[name] = subprocess.Popen(command, env=env)
    # Both run for the whole cap (not until the first passes bicubic): the curves after
    # that point are part of the comparison.
    deadline = start + args.minutes * 60
    while time.time() < deadline and any(p.poll() is None for p in processes.values()):
        time.sleep(min(15.0, max(0.0, deadline - time.time())))
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the job checkpoints and exits 0
    codes = {name: process.wait() for name, process in processes.items()}
    elapsed = (time.time() - start) / 60

    curves, bicubic = {}, None
    for name, run_dir in run_dirs.items():
        curve, bicubic_here = read_curve(os.path.join(run_dir, "tb"))
        if not curve:
            raise SystemExit(f"{name}: no validation happened (exit code {codes[name]}); raise --minutes or "
                             "lower --val-every")
        bicubic = bicubic_here
        curves[name] = [(step, (wall - start) / 60, psnr) for step, wall, psnr in curve]
    print(f"\nsr train --preset demo_x2 (PSNR stage, x2, L1, Adam 1e-3, 64 px GT crops, batch 16, EMA 0.99), "
          f"1 torch thread per run, both runs at "
          f"once for {elapsed:.1f} min (cap {args.minutes:g}); training: the 4 photos of assets/images; "
          "validation: scikit-image rocket + motorcycle, PSNR-Y (EMA generator), border 2\n")
    for name, rows in curves.items():
        print(f"{name} ({' '.join(MODELS[name][0])}):")
        print("|   step | minutes | val PSNR-Y (EMA) | bicubic |")
        print("|--------|---------|------------------|---------|")
        for step, minutes, psnr in rows:
            print(f"| {step:6d} | {minutes:7.1f} | {psnr:13.2f} dB | {bicubic:.2f} dB |")
        print()
    print("| generator | steps in the cap | last val PSNR-Y | vs bicubic | passes bicubic at |")
    print("|---|---|---|---|---|")
    for name, rows in curves.items():
        step, _, psnr = rows[-1]
        print(f"| {name} | {step} | {psnr:.2f} dB | {psnr - bicubic:+.2f} dB | {passing_point(rows, bicubic)} |")
    plot({name: [(m, p) for _, m, p in rows] for name, rows in curves.items()}, bicubic, args.png,
         f"sr train x2 on assets/images, side by side for {elapsed:.0f} min; validation on 2 other photos")
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
