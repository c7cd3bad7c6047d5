"""Turned pictures: find the turn of a picture rotated onto a larger canvas, and undo it.

A picture turned by a few degrees "with the canvas grown to hold it" (what image editors and
`PIL.Image.rotate(..., expand=True)` do) sits, tilted, in a canvas whose four corners are triangles
of one plain fill colour (black, white...). A descriptor of the whole canvas sees those triangles
and the tilt; a query like that finds its original less easily, and once it is also cropped or
blurred, often not at all. The turn can be read off the canvas itself: for a turn of t degrees
the tilted picture's rectangle is known from the canvas size alone, so each candidate t predicts
where the plain triangles are; the right one is where they are plain (fill-coloured) and the
picture's edge, just inside them, is not. `find_turn` tests every whole degree in `TURN_RANGE`
either way on a small copy (then quarters and tenths around the best on one twice as large), and
`undo_turn` turns the picture back and cuts out its upright rectangle. Most pictures are settled
at once, whatever their size, by their corners (not one plain colour); one with plain corners
costs ~5-20 ms. Measured on turned photos (tests/test_upright.py) to within half a degree.

Only a clear case counts: all four corners of the canvas the same plain colour, at least
`MIN_PLAIN_SHARE` of the predicted triangles that colour, and at least `MIN_EDGE_SHARE` of a band
just inside the tilted edges not. A picture with a plain background or a plain margin (clip-art
on a white page, a letterboxed frame) fails the second test, since its edge band is plain too.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

TURN_RANGE = (2.0, 30.0)
"""The turns looked for, in degrees either way (smaller ones barely change a descriptor)."""

TURN_STEP = 1.0
"""The coarse search's step in degrees; the best one is then refined to a tenth of a degree."""

SAMPLE_SIDE = 160
"""The canvas is judged on a copy this many pixels on its longer side (the coarse search on one
half as large)."""

FILL_TOLERANCE = 24
"""How far (per channel, 0-255) a pixel may be from the fill colour and count as fill (JPEG noise)."""

MIN_PLAIN_SHARE = 0.94
"""At least this share of the predicted corner triangles must be fill-coloured."""

MIN_EDGE_SHARE = 0.75
"""At least this share of a band just inside the tilted picture's edges must not be."""

EDGE_BAND = 0.03
"""That band's width, as a share of the canvas's shorter side."""


class _Canvas:
    """Which pixels of a reduced copy of a picture are its corners' fill colour, and where each is."""

    def __init__(self, img: Image.Image, side: int, fill: np.ndarray | None = None):
        scale = side / max(img.size)
        small = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                           Image.Resampling.BILINEAR) if scale < 1 else img
        pixels = np.asarray(small, dtype=np.int16)
        self.h, self.w = pixels.shape[:2]
        if fill is None:
            corners = np.stack([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]])
            if int(np.max(corners.max(axis=0) - corners.min(axis=0))) <= FILL_TOLERANCE:
                fill = np.median(corners, axis=0).astype(np.int16)
        self.fill = fill  # None: the corners are not one plain colour
        if fill is not None:
            self.plain = np.abs(pixels - fill).max(axis=2) <= FILL_TOLERANCE
            # pixel centres relative to the canvas's centre (y down), as a row and a column
            self.px = (np.arange(self.w, dtype=np.float32) + 0.5 - self.w / 2)[None, :]
            self.py = (np.arange(self.h, dtype=np.float32) + 0.5 - self.h / 2)[:, None]

    def judge(self, angle: float) -> float | None:
        """How well a turn by `angle` explains the canvas (higher is better), or None if it fails a test:
        the predicted triangles' plain pixels, less three times their other pixels (a turn too small
        predicts too little of the plain area, one too large reaches into the picture)."""
        w, h = self.w, self.h
        inside = _distance_inside(angle, w, h, self.px, self.py)
        if inside is None:
            return None
        outside = inside < -0.25 * max(w, h) / SAMPLE_SIDE  # clear of the edge's own blended pixels
        band = (inside > 1.0) & (inside <= 1.0 + EDGE_BAND * min(w, h))
        total = int(outside.sum())
        if total < 0.01 * w * h or band.sum() < 8:
            return None
        filled = int(self.plain[outside].sum())
        if filled < MIN_PLAIN_SHARE * total or (~self.plain[band]).mean() < MIN_EDGE_SHARE:
            return None
        return filled - 3.0 * (total - filled)


def find_turn(img: Image.Image) -> float | None:
    """The angle (degrees, counter-clockwise as `Image.rotate` takes it) by which `img` looks
    turned on a plain canvas, or None where it does not clearly look so."""
    if min(img.size) < 16:
        return None
    if not _plain_corners(img):
        return None  # most pictures: decided at any size from four small patches
    small = img
    factor = max(small.size) // (2 * SAMPLE_SIDE)
    if factor > 1:  # a large picture: box-averaged first (cheap), then resized
        small = small.reduce(factor) if small.mode in _REDUCIBLE else small.convert("RGB").reduce(factor)
    if small.mode != "RGB":
        small = small.convert("RGB")
    coarse = _Canvas(small, SAMPLE_SIDE // 2)
    if coarse.fill is None:
        return None
    best: tuple[float, float] | None = None  # (score, angle)
    low, high = TURN_RANGE
    for sign in (1, -1):
        # a few degrees past the range: a larger turn's best fit must not pass for its largest one
        for step in np.arange(low, high + 2 * TURN_STEP + 1e-9, TURN_STEP):
            score = coarse.judge(sign * float(step))
            if score is not None and (best is None or score > best[0]):
                best = (score, sign * float(step))
    if best is None or abs(best[1]) > high:
        return None
    fine = _Canvas(small, SAMPLE_SIDE, coarse.fill)
    found: tuple[float, float] | None = None
    for step, reach in ((0.25, TURN_STEP), (0.1, 0.2)):  # quarters of a degree, then tenths
        around = abs(best[1] if found is None else found[1])
        for size in np.arange(max(low, around - reach), min(high, around + reach) + 1e-9, step):
            candidate = math.copysign(round(float(size), 2), best[1])
            score = fine.judge(candidate)
            if score is not None and (found is None or score > found[0]):
                found = (score, candidate)
        if found is None:
            return None
    return round(found[1], 1)


_REDUCIBLE = frozenset({"RGB", "L", "RGBA", "LA", "I", "F", "CMYK"})
"""Modes `Image.reduce` takes (a palette picture is converted first)."""

CORNER_PATCH = 0.02
"""`_plain_corners` looks at squares this share of the shorter side (at least 2 pixels) in each corner."""


def _plain_corners(img: Image.Image) -> bool:
    """Whether the four corners are one plain colour (each corner patch's mean within
    `FILL_TOLERANCE` of the others), looked at in the picture itself at whatever size."""
    side = max(2, round(min(img.size) * CORNER_PATCH))
    w, h = img.size
    means = []
    for left, top in ((0, 0), (w - side, 0), (0, h - side), (w - side, h - side)):
        patch = img.crop((left, top, left + side, top + side))
        means.append(np.asarray(patch if patch.mode == "RGB" else patch.convert("RGB"), dtype=np.float32)
                     .reshape(-1, 3).mean(axis=0))
    means = np.stack(means)
    return bool(np.isfinite(means).all()) and float(np.max(means.max(axis=0) - means.min(axis=0))) <= FILL_TOLERANCE


def _distance_inside(angle: float, w: int, h: int, px: np.ndarray, py: np.ndarray) -> np.ndarray | None:
    """Each pixel's distance inside the edges of the picture that a turn by `angle` onto a `w` x
    `h` canvas would have left there (negative outside); None if no picture fits that turn."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(abs(angle)))
    det = c * c - s * s
    if det <= 0:
        return None
    width, height = (c * w - s * h) / det, (c * h - s * w) / det
    if width < 4 or height < 4:
        return None
    # turn the pixel positions back into the picture's own axes (Image.rotate turns counter-clockwise
    # on screen; with y down that is a clockwise turn of the coordinates)
    t = math.radians(angle)
    u = px * math.cos(t) - py * math.sin(t)
    v = px * math.sin(t) + py * math.cos(t)
    return np.minimum(width / 2 - np.abs(u), height / 2 - np.abs(v))


def undo_turn(img: Image.Image, angle: float) -> Image.Image:
    """`img` (turned by `angle` onto a grown canvas) turned back, its upright rectangle cut out
    (at the picture's own size: a caller that needs fewer pixels reduces it first)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(abs(angle)))
    det = c * c - s * s
    if det <= 0:  # 45 degrees or more: no upright rectangle is determined by the canvas
        return img
    width, height = (c * img.width - s * img.height) / det, (c * img.height - s * img.width) / det
    back = img.rotate(-angle, Image.Resampling.BICUBIC, expand=True)
    left, top = (back.width - width) / 2, (back.height - height) / 2
    # a pixel in from each side: the turned edges' resampled pixels blend with the fill
    box = (math.ceil(left) + 1, math.ceil(top) + 1, math.floor(left + width) - 1, math.floor(top + height) - 1)
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return img
    return back.crop(box)

