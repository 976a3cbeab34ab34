"""The two pictures of an evaluation report, drawn with Pillow alone.

The worker already depends on Pillow; a plotting library (matplotlib and its font and
backend machinery) would be a heavy dependency of the image for two PNGs. The layouts are
computed up front (`confusion_matrix_size`, `RELIABILITY_SIZE`) so that callers and tests
know the picture sizes without decoding them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from consumer.eval.metrics import CalibrationBin

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]

BACKGROUND: Colour = (255, 255, 255)
INK: Colour = (33, 33, 33)
GRID: Colour = (210, 210, 210)
BAR: Colour = (66, 114, 196)
GAP: Colour = (220, 80, 60)
# Sequential colour scale for the confusion matrix: light for 0, dark blue for 1.
_SCALE: tuple[Colour, ...] = (
    (247, 251, 255),
    (198, 219, 239),
    (107, 174, 214),
    (33, 113, 181),
    (8, 48, 107),
)


@cache
def font(size: int) -> Font:
    """Pillow's bundled font at `size` px (FreeType), or its bitmap font without FreeType."""
    return ImageFont.load_default(size=size)


def scale_colour(value: float) -> Colour:
    """The colour of `value` in [0, 1] on the confusion matrix's scale (linear between stops)."""
    value = min(max(value, 0.0), 1.0) * (len(_SCALE) - 1)
    i = min(int(value), len(_SCALE) - 2)
    t = value - i
    low, high = _SCALE[i], _SCALE[i + 1]
    return (
        round(low[0] + (high[0] - low[0]) * t),
        round(low[1] + (high[1] - low[1]) * t),
        round(low[2] + (high[2] - low[2]) * t),
    )


def _ink_on(colour: Colour) -> Colour:
    """Black or white text, whichever reads better on `colour`."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return INK if luminance > 140 else BACKGROUND


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text)
    return int(right - left), int(bottom - top)


def _centred(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill: Colour
) -> None:
    draw.text(xy, text, fill=fill, font=font(size), anchor="mm")


def _vertical_text(
    image: Image.Image, centre: tuple[int, int], text: str, size: int, fill: Colour
) -> None:
    """Text turned 90° counter-clockwise (an axis title on the left), centred at `centre`."""
    width, height = _text_size(text, size)
    strip = Image.new("L", (width + 8, height + 8), 0)
    ImageDraw.Draw(strip).text((4, 4 + height / 2), text, fill=255, font=font(size), anchor="lm")
    strip = strip.rotate(90, expand=True)
    ink = Image.new("RGB", strip.size, fill)
    image.paste(ink, (centre[0] - strip.width // 2, centre[1] - strip.height // 2), strip)


# ---- confusion matrix --------------------------------------------------------------------

_MARGIN = 16
_TITLE_H = 40
_AXIS_TITLE = 26  # band for "true label" (left) and "predicted label" (bottom)
_TICK_BAND = 24  # band for the column labels under the grid
_LABEL_SIZE = 13
_CELL_SIZE = 14
_BAR_GAP = 24
_BAR_W = 18
_BAR_TICKS = 52


@dataclass(frozen=True, slots=True)
class _MatrixLayout:
    cell: int
    label_w: int
    n: int

    @property
    def grid_x(self) -> int:
        return _MARGIN + _AXIS_TITLE + self.label_w

    @property
    def grid_y(self) -> int:
        return _MARGIN + _TITLE_H

    @property
    def grid(self) -> int:
        return self.cell * self.n

    @property
    def size(self) -> tuple[int, int]:
        width = self.grid_x + self.grid + _BAR_GAP + _BAR_W + _BAR_TICKS + _MARGIN
        height = self.grid_y + self.grid + _TICK_BAND + _AXIS_TITLE + _MARGIN
        return width, height


def _matrix_layout(labels: Sequence[str]) -> _MatrixLayout:
    widest = max(_text_size(label, _LABEL_SIZE)[0] for label in labels)
    # Square cells wide enough for the longest column label (and "100.0%").
    return _MatrixLayout(cell=max(64, widest + 14), label_w=widest + 12, n=len(labels))


def confusion_matrix_size(labels: Sequence[str]) -> tuple[int, int]:
    """(width, height) in pixels of the confusion matrix picture for these labels."""
    return _matrix_layout(labels).size


def draw_confusion_matrix(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str = "Confusion matrix"
) -> Image.Image:
    """Rows true, columns predicted; each cell shows its count and its share of the row
    (the per-class recall on the diagonal), coloured by that share so that classes with
    few examples are as readable as the big ones."""
    if not labels or len(matrix) != len(labels) or any(len(r) != len(labels) for r in matrix):
        raise ValueError(f"matrix must be {len(labels)}x{len(labels)} for labels {list(labels)}")
    layout = _matrix_layout(labels)
    image = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell, gx, gy = layout.cell, layout.grid_x, layout.grid_y
    _centred(draw, (layout.size[0] / 2, _MARGIN + _TITLE_H / 2 - 4), title, 16, INK)
    for i, row in enumerate(matrix):
        total = sum(row)
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            colour = scale_colour(share)
            x, y = gx + j * cell, gy + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=BACKGROUND)
            ink = _ink_on(colour)
            _centred(draw, (x + cell / 2, y + cell / 2 - 8), str(count), _CELL_SIZE, ink)
            share_text = f"{100 * share:.1f}%" if total else "-"
            _centred(draw, (x + cell / 2, y + cell / 2 + 9), share_text, _CELL_SIZE - 3, ink)
    draw.rectangle((gx - 1, gy - 1, gx + layout.grid, gy + layout.grid), outline=INK)
    for i, label in enumerate(labels):
        # Row labels right-aligned against the grid; column labels centred under it.
        draw.text(
            (gx - 6, gy + i * cell + cell / 2), label, fill=INK, font=font(_LABEL_SIZE), anchor="rm"
        )
        _centred(
            draw,
            (gx + i * cell + cell / 2, gy + layout.grid + _TICK_BAND / 2),
            label,
            _LABEL_SIZE,
            INK,
        )
    _centred(
        draw,
        (gx + layout.grid / 2, gy + layout.grid + _TICK_BAND + _AXIS_TITLE / 2),
        "predicted label",
        _LABEL_SIZE + 1,
        INK,
    )
    _vertical_text(
        image,
        (_MARGIN + _AXIS_TITLE // 2, gy + layout.grid // 2),
        "true label",
        _LABEL_SIZE + 1,
        INK,
    )
    _colour_bar(draw, gx + layout.grid + _BAR_GAP, gy, layout.grid)
    return image


def _colour_bar(draw: ImageDraw.ImageDraw, x: int, y: int, height: int) -> None:
    """The scale: share of the true row, 100% at the top."""
    for k in range(height):
        draw.line((x, y + k, x + _BAR_W - 1, y + k), fill=scale_colour(1 - k / max(height - 1, 1)))
    draw.rectangle((x - 1, y - 1, x + _BAR_W, y + height), outline=INK)
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y + (1 - share) * (height - 1)
        draw.line((x + _BAR_W, ty, x + _BAR_W + 4, ty), fill=INK)
        draw.text((x + _BAR_W + 7, ty), f"{100 * share:.0f}%", fill=INK, font=font(11), anchor="lm")
    draw.text((x + _BAR_W / 2, y - 6), "row %", fill=INK, font=font(11), anchor="mb")


def write_confusion_matrix(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], path: Path, title: str
) -> Path:
    """Draw the confusion matrix and save it as PNG at `path`."""
    draw_confusion_matrix(labels, matrix, title).save(path, format="PNG")
    return path


# ---- reliability diagram -----------------------------------------------------------------

RELIABILITY_SIZE = (640, 590)
_PLOT_X, _PLOT_Y, _PLOT_W, _PLOT_H = 78, 60, 520, 440


def draw_reliability(
    bins: Sequence[CalibrationBin], ece: float, title: str = "Reliability"
) -> Image.Image:
    """Accuracy per confidence bin (bars) against perfect calibration (dashed diagonal).

    The red band on each bar spans the gap between the bin's accuracy and its mean
    confidence, and the number above it is the bin's example count: a large gap in a bin
    of three faces matters less than a small one in a bin of three thousand.
    """
    image = Image.new("RGB", RELIABILITY_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    x0, y0, w, h = _PLOT_X, _PLOT_Y, _PLOT_W, _PLOT_H

    def px(value: float) -> float:
        return x0 + value * w

    def py(value: float) -> float:
        return y0 + (1 - value) * h

    _centred(draw, (RELIABILITY_SIZE[0] / 2, 22), f"{title}  (ECE {ece:.4f})", 16, INK)
    for k in range(6):  # grid lines and ticks at 0, 0.2, ..., 1
        v = k / 5
        draw.line((px(0), py(v), px(1), py(v)), fill=GRID)
        draw.line((px(v), py(0), px(v), py(1)), fill=GRID)
        draw.text((px(0) - 8, py(v)), f"{v:.1f}", fill=INK, font=font(12), anchor="rm")
        draw.text((px(v), py(0) + 8), f"{v:.1f}", fill=INK, font=font(12), anchor="mt")
    for b in bins:
        if not b.count or b.accuracy is None or b.confidence is None:
            continue
        left, right = px(b.lower) + 2, px(b.upper) - 2
        draw.rectangle((left, py(b.accuracy), right, py(0)), fill=BAR, outline=INK)
        low, high = sorted((b.accuracy, b.confidence))
        if py(low) - py(high) >= 1:
            draw.rectangle((left, py(high), right, py(low)), outline=GAP, width=2)
        count_y = min(py(max(b.accuracy, b.confidence)) - 4, py(0) - 4)
        draw.text(
            ((left + right) / 2, max(count_y, y0 + 12)),
            str(b.count),
            fill=INK,
            font=font(10),
            anchor="mb",
        )
    _dashed(draw, (px(0), py(0)), (px(1), py(1)), INK)
    draw.rectangle((px(0), py(1), px(1), py(0)), outline=INK)
    _centred(draw, (x0 + w / 2, y0 + h + 36), "confidence (probability of the prediction)", 14, INK)
    _vertical_text(image, (18, int(y0 + h / 2)), "accuracy", 14, INK)
    _legend(draw, x0, y0 + h + 62)
    return image


def _legend(draw: ImageDraw.ImageDraw, x: float, y: float) -> None:
    entries: list[tuple[str, str]] = [
        ("bar", "accuracy in bin (count above)"),
        ("gap", "gap to mean confidence"),
        ("line", "perfect calibration"),
    ]
    for kind, text in entries:
        if kind == "bar":
            draw.rectangle((x, y - 6, x + 18, y + 6), fill=BAR, outline=INK)
        elif kind == "gap":
            draw.rectangle((x, y - 6, x + 18, y + 6), outline=GAP, width=2)
        else:
            _dashed(draw, (x, y), (x + 18, y), INK)
        draw.text((x + 24, y), text, fill=INK, font=font(12), anchor="lm")
        x += 30 + _text_size(text, 12)[0] + 12


def _dashed(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    fill: Colour,
    dash: float = 8.0,
) -> None:
    (ax, ay), (bx, by) = start, end
    length = ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5
    steps = max(int(length // dash), 1)
    for k in range(0, steps, 2):
        t0, t1 = k / steps, min((k + 1) / steps, 1.0)
        draw.line(
            (ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
            fill=fill,
            width=2,
        )


def write_reliability(bins: Sequence[CalibrationBin], ece: float, path: Path, title: str) -> Path:
    """Draw the reliability diagram and save it as PNG at `path`."""
    draw_reliability(bins, ece, title).save(path, format="PNG")
    return path
