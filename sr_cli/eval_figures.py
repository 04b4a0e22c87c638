"""Figures of ``sr eval``, drawn with Pillow alone (its bundled FreeType font keeps the
labels readable at any size; no plotting library needed):

- a crop grid per chosen image: the whole HR image with the crop marked, then the same
  crop from every method and from HR, each enlarged with nearest-neighbour (so pixels
  stay pixels) and labelled with the method's name and its PSNR/SSIM on the whole image;
- a bar chart per set: mean PSNR and mean SSIM of every method.

The layout constants below fix each figure's size: a crop grid of ``n`` panels is
``grid_size(n)`` pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 256
"""Side of one panel's picture, in figure pixels."""
CROP = 64
"""Side of the crop, in HR pixels (shown enlarged PANEL / CROP = 4 times)."""
MAX_COLUMNS = 5
MARGIN = 12
TITLE_HEIGHT = 44
LABEL_HEIGHT = 54
BACKGROUND = (255, 255, 255)
PANEL_BACKGROUND = (235, 235, 235)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
MARK = (230, 30, 30)
BASELINE_COLOUR = (160, 160, 160)
MODEL_COLOUR = (31, 119, 180)
GRID = (225, 225, 225)


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1 with FreeType, which its wheels have)."""
    return ImageFont.load_default(size=size)


def _fit(text: str, face: ImageFont.FreeTypeFont, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def _luma(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114])


# ---------------------------------------------------------------- crop grid


def crop_side(height: int, width: int) -> int:
    return min(CROP, height, width)


def choose_crop(outputs: list[np.ndarray], side: int) -> tuple[int, int]:
    """Top-left (y, x) of the ``side`` x ``side`` window where the outputs differ most
    from each other: the largest sum of the per-pixel standard deviation of their luma."""
    spread = np.std(np.stack([_luma(o) for o in outputs]), axis=0)
    height, width = spread.shape
    integral = np.pad(spread.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, side // 4)
    ys = list(range(0, height - side + 1, step))
    xs = list(range(0, width - side + 1, step))
    ys += [height - side] if ys[-1] != height - side else []
    xs += [width - side] if xs[-1] != width - side else []
    y, x = np.array(ys)[:, None], np.array(xs)[None, :]
    sums = integral[y + side, x + side] - integral[y, x + side] - integral[y + side, x] + integral[y, x]
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(ys[iy]), int(xs[ix])


def grid_shape(num_panels: int) -> tuple[int, int]:
    """(rows, columns) of a crop grid: at most MAX_COLUMNS wide, rows filled evenly."""
    rows = math.ceil(num_panels / MAX_COLUMNS)
    return rows, math.ceil(num_panels / rows)


def grid_size(num_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a crop grid with ``num_panels`` panels."""
    rows, columns = grid_shape(num_panels)
    return (columns * PANEL + (columns + 1) * MARGIN,
            TITLE_HEIGHT + rows * (PANEL + LABEL_HEIGHT + MARGIN) + MARGIN)


def panel_origin(index: int, num_panels: int) -> tuple[int, int]:
    """(x, y) of the top-left corner of panel ``index``'s picture area."""
    row, column = divmod(index, grid_shape(num_panels)[1])
    return MARGIN + column * (PANEL + MARGIN), TITLE_HEIGHT + row * (PANEL + LABEL_HEIGHT + MARGIN)


def zoom_for(side: int) -> int:
    return max(1, PANEL // side)


def crop_grid(title: str, hr: np.ndarray, panels: list[tuple[str, np.ndarray, float, float]],
              corner: tuple[int, int], side: int) -> Image.Image:
    """The figure: panel 0 the whole HR image with the crop marked, then one panel per
    ``(label, image, psnr, ssim)`` showing the crop at ``corner`` (y, x) of ``side``
    pixels, enlarged ``zoom_for(side)`` times with nearest-neighbour, centred."""
    num_panels = 1 + len(panels)
    figure = Image.new("RGB", grid_size(num_panels), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    title_font, name_font, value_font = font(22), font(19), font(16)
    draw.text((MARGIN, TITLE_HEIGHT // 2), _fit(title, title_font, figure.width - 2 * MARGIN), font=title_font,
              fill=TEXT, anchor="lm")
    y0, x0 = corner
    height, width = hr.shape[:2]

    # Panel 0: the whole image, scaled to fit, with the crop outlined.
    px, py = panel_origin(0, num_panels)
    draw.rectangle((px, py, px + PANEL - 1, py + PANEL - 1), fill=PANEL_BACKGROUND)
    factor = min(PANEL / width, PANEL / height)
    thumb_w, thumb_h = max(1, round(width * factor)), max(1, round(height * factor))
    thumb = Image.fromarray(_rgb(hr)).resize((thumb_w, thumb_h), Image.Resampling.LANCZOS)
    tx, ty = px + (PANEL - thumb_w) // 2, py + (PANEL - thumb_h) // 2
    figure.paste(thumb, (tx, ty))
    draw.rectangle((tx + x0 * factor, ty + y0 * factor, tx + (x0 + side) * factor - 1,
                    ty + (y0 + side) * factor - 1), outline=MARK, width=2)
    _label(draw, px, py, f"HR {width}x{height}", f"crop {side}x{side} at x={x0}, y={y0}", name_font, value_font)

    zoom = zoom_for(side)
    shown = side * zoom
    for index, (label, image, psnr, ssim) in enumerate(panels, start=1):
        px, py = panel_origin(index, num_panels)
        draw.rectangle((px, py, px + PANEL - 1, py + PANEL - 1), fill=PANEL_BACKGROUND)
        crop = _rgb(image[y0:y0 + side, x0:x0 + side])
        enlarged = crop.repeat(zoom, axis=0).repeat(zoom, axis=1)
        offset = (PANEL - shown) // 2
        figure.paste(Image.fromarray(np.ascontiguousarray(enlarged)), (px + offset, py + offset))
        values = "ground truth" if math.isnan(psnr) else (
            f"PSNR {'inf' if math.isinf(psnr) else f'{psnr:.2f}'} dB   SSIM {ssim:.4f}")
        _label(draw, px, py, label, values, name_font, value_font)
    return figure


def _label(draw: ImageDraw.ImageDraw, px: int, py: int, name: str, values: str,
           name_font: ImageFont.FreeTypeFont, value_font: ImageFont.FreeTypeFont) -> None:
    draw.text((px, py + PANEL + 6), _fit(name, name_font, PANEL), font=name_font, fill=TEXT)
    draw.text((px, py + PANEL + 30), _fit(values, value_font, PANEL), font=value_font, fill=MUTED)


# ---------------------------------------------------------------- bar chart

BAR_WIDTH = 1000
BAR_LABEL_WIDTH = 300
BAR_VALUE_WIDTH = 90
BAR_ROW = 32
BAR_SECTION_TITLE = 40
BAR_AXIS = 30


def bar_chart_size(num_methods: int) -> tuple[int, int]:
    section = BAR_SECTION_TITLE + num_methods * BAR_ROW + BAR_AXIS
    return BAR_WIDTH, TITLE_HEIGHT + MARGIN + 2 * (section + MARGIN)


def _axis(values: list[float], metric: str) -> tuple[float, float, float]:
    """(low, high, tick step) of a readable axis around ``values``. Bars start at
    ``low``, not 0: SR methods differ by tenths of a dB on a 30 dB scale."""
    lo, hi = min(values), max(values)
    if metric == "psnr":
        step = 1.0 if hi - lo < 6 else 2.0 if hi - lo < 12 else 5.0
        low = max(0.0, math.floor(lo / step) * step - step)
        high = math.ceil(hi / step) * step
    else:
        step = 0.05 if hi - lo < 0.25 else 0.1
        low = max(0.0, math.floor(lo / step) * step - step)
        high = min(1.0, math.ceil(hi / step) * step)
    if high <= low:
        high = low + step
    return low, high, step


def bar_chart(title: str, subtitle: str, rows: list[tuple[str, str, float | None, float | None]]) -> Image.Image:
    """Mean PSNR and mean SSIM per method: ``rows`` are (name, kind, psnr, ssim);
    baselines gray, models blue, the value written at the end of each bar."""
    figure = Image.new("RGB", bar_chart_size(len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    title_font, text_font, small_font = font(22), font(18), font(15)
    draw.text((MARGIN, 8), _fit(title, title_font, BAR_WIDTH - 2 * MARGIN), font=title_font, fill=TEXT)
    draw.text((MARGIN, 32), _fit(subtitle, small_font, BAR_WIDTH - 2 * MARGIN - 240), font=small_font, fill=MUTED)
    # Legend, top right.
    x = BAR_WIDTH - MARGIN - 230
    for colour, text in ((BASELINE_COLOUR, "interpolation"), (MODEL_COLOUR, "model")):
        draw.rectangle((x, 14, x + 16, 30), fill=colour)
        draw.text((x + 22, 22), text, font=small_font, fill=TEXT, anchor="lm")
        x += 22 + int(small_font.getlength(text)) + 24
    top = TITLE_HEIGHT + MARGIN
    x_left = MARGIN + BAR_LABEL_WIDTH
    x_right = BAR_WIDTH - MARGIN - BAR_VALUE_WIDTH
    for metric, column, heading in (("psnr", 2, "mean PSNR (dB)"), ("ssim", 3, "mean SSIM")):
        values = [r[column] for r in rows if r[column] is not None]
        draw.text((MARGIN, top + 10), heading, font=text_font, fill=TEXT)
        bars_top = top + BAR_SECTION_TITLE
        bars_bottom = bars_top + len(rows) * BAR_ROW
        if values:
            low, high, step = _axis(values, metric)

            def x_of(v: float) -> float:
                return x_left + (v - low) / (high - low) * (x_right - x_left)

            tick = low
            while tick <= high + 1e-9:
                x = x_of(tick)
                draw.line((x, bars_top, x, bars_bottom), fill=GRID)
                draw.text((x, bars_bottom + 4), f"{tick:g}", font=small_font, fill=MUTED, anchor="ma")
                tick += step
            best = max(values)
        for i, (name, kind, *scores) in enumerate(rows):
            value = scores[column - 2]
            y = bars_top + i * BAR_ROW
            draw.text((x_left - 10, y + BAR_ROW // 2), _fit(name, text_font, BAR_LABEL_WIDTH - 10), font=text_font,
                      fill=TEXT, anchor="rm")
            if value is None:
                draw.text((x_left + 4, y + BAR_ROW // 2), "—", font=text_font, fill=MUTED, anchor="lm")
                continue
            end = x_of(value)
            colour = MODEL_COLOUR if kind == "model" else BASELINE_COLOUR
            draw.rectangle((x_left, y + 5, max(end, x_left + 1), y + BAR_ROW - 5), fill=colour)
            text = f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"
            draw.text((end + 6, y + BAR_ROW // 2), text + ("  (best)" if value == best else ""), font=small_font,
                      fill=TEXT, anchor="lm")
        draw.line((x_left, bars_top, x_left, bars_bottom), fill=MUTED)
        top = bars_bottom + BAR_AXIS + MARGIN
    return figure


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
