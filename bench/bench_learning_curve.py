"""Does the recipe learn? The `small` RRDBNet x2 trained (PSNR stage, L1) by `sr train` on
the sample photographs in assets/images, validated on other photographs (scikit-image's
rocket and motorcycle), until its validation PSNR-Y beats bicubic's or ``--minutes``
pass. Prints the curve as a table and draws it (with the bicubic line) into a PNG.

    .venv/bin/python bench/bench_learning_curve.py [--minutes 60] [--png docs/learning_curve_x2.png]

The time cap is enforced the way a spot VM ends a run: SIGTERM, after which the job
writes a checkpoint and exits 0 (so the run can also be continued with --resume auto).
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
sys.path.insert(0, str(REPO))


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
    tags = acc.Tags()["scalars"]
    if "val/psnr" not in tags:
        return [], None
    curve = [(e.step, e.wall_time, e.value) for e in acc.Scalars("val/psnr")]
    return curve, acc.Scalars("val/psnr_bicubic")[0].value


def plot(curve: list[tuple[float, float]], bicubic: float, path: str, title: str) -> None:
    """A line chart of (minutes, PSNR) with the bicubic level, drawn with Pillow."""
    width, height, left, right, top, bottom = 900, 520, 70, 20, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [m for m, _ in curve] or [0.0]
    ys = [p for _, p in curve] + [bicubic]
    x_max = max(xs) or 1.0
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
        draw.text((px - 10, height - bottom + 8), f"{x:.0f}", fill="black")
    draw.text((width // 2 - 40, height - 25), "minutes", fill="black")
    draw.text((left, 10), title, fill="black")
    _, by = to_px(0, bicubic)
    for x in range(left, width - right, 12):  # dashed bicubic line
        draw.line([x, by, x + 6, by], fill=(200, 0, 0), width=2)
    draw.text((width - right - 230, by - 18), f"bicubic {bicubic:.2f} dB", fill=(200, 0, 0))
    points = [to_px(m, p) for m, p in curve]
    if len(points) > 1:
        draw.line(points, fill=(0, 70, 200), width=3)
    for px, py in points:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(0, 70, 200))
    draw.text((left + 10, top + 10), "small RRDBNet x2, validation PSNR-Y", fill=(0, 70, 200))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="time cap (default: 60)")
    parser.add_argument("--val-every", type=int, default=250, help="steps between validations (default: 250)")
    parser.add_argument("--lr", type=float, default=2e-4, help="generator learning rate (default: 2e-4)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    parser.add_argument("--png", default=str(REPO / "docs" / "learning_curve_x2.png"))
    parser.add_argument("--work", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench-curve-")
    from jobs.prepare import PrepareSettings, prepare

    shards, val, run_dir = (os.path.join(work, n) for n in ("shards", "val", "run"))
    if not os.path.exists(os.path.join(shards, "index.json")):
        prepare(str(REPO / "assets" / "images"), shards, PrepareSettings(size=128, step=64, format="raw"),
                progress=False)
    validation_folder(val)
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "jobs.train", "--preset", "tiny", f"data.train_shards={shards}",
               f"data.val_folder={val}", f"train.run_dir={run_dir}", "model.generator_variant=small", "data.scale=2",
               "data.gt_size=64", f"data.batch_size={args.batch}", "data.num_workers=2", f"optim.lr_g={args.lr}",
               "train.max_steps=100000000", f"train.val_every={args.val_every}", "train.checkpoint_every=5000",
               "train.log_every=50", "train.ema_decay=0.999", "train.progress=false",
               "train.sync_tensorboard_seconds=10"]
    print("$ " + " ".join(command), file=sys.stderr)
    start = time.time()
    process = subprocess.Popen(command)
    reason = "time cap"
    while process.poll() is None:
        time.sleep(15)
        curve, bicubic = read_curve(os.path.join(run_dir, "tb"))
        if curve and curve[-1][2] > bicubic:
            reason = "beat bicubic"
            break
        if time.time() - start > args.minutes * 60:
            break
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the job checkpoints and exits 0
    code = process.wait()
    curve, bicubic = read_curve(os.path.join(run_dir, "tb"))
    if not curve:
        raise SystemExit(f"no validation happened (exit code {code}); raise --minutes or lower --val-every")
    t0 = start
    rows = [(step, (wall - t0) / 60, psnr) for step, wall, psnr in curve]
    print(f"\nsmall RRDBNet x2 (L1, Adam lr {args.lr}, batch {args.batch} of 64 px, EMA 0.999) on the 4 photos "
          f"of assets/images; validation: scikit-image rocket + motorcycle, PSNR-Y, border 2; stopped by: "
          f"{reason} after {(time.time() - start) / 60:.1f} min (cap {args.minutes:g} min)\n")
    print("|   step | minutes | val PSNR-Y (EMA) | bicubic |")
    print("|--------|---------|------------------|---------|")
    for step, minutes, psnr in rows:
        print(f"| {step:6d} | {minutes:7.1f} | {psnr:13.2f} dB | {bicubic:.2f} dB |")
    plot([(m, p) for _, m, p in rows], bicubic, args.png,
         f"sr train, small RRDBNet x2 on assets/images; validation on 2 other photos ({reason})")
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
