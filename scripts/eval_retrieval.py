"""Measure what imgsim returns: near-duplicate recall and category precision on a labelled folder.

    python scripts/eval_data.py eval-data                 # skimage photos + Tux Paint stamps
    python scripts/eval_retrieval.py eval-data            # imgsim as it is + the candidate variants
    python scripts/eval_retrieval.py eval-data --configs imgsim,squash224-gem3 --json

FOLDER's immediate sub-folders are labels (files directly in FOLDER have none). Two things are measured:

1. Near-duplicates. Every image is altered in seeded random ways (`--per-image` of the ALTERATIONS
   each, chosen per image; ``all`` for every one) and saved as JPEG; each altered copy is a query
   that must find its original first. Reported: recall@1 and mAP (the relevant set is the
   original plus any byte-identical copies of it), overall and per alteration; the JSON also has
   each alteration's mean similarity between query and original. The alterations: downscaling,
   JPEG quality 8-20, crops keeping 90-75% and 75-60% of each side, greyscale, mirror, rotation
   by 3-15 degrees with black or white borders, Gaussian blur, brightness x0.5-0.75 or x1.3-1.7,
   a caption band over the bottom 12-22%, letterbox or pillarbox bars, stretching by 1.25-1.6,
   the picture pasted at 35-60% onto a plain canvas, EXIF-rotated storage (a phone photo), and
   combinations of two or three everyday edits. `--hard` adds, for every image, the hard ones
   (HARD_ALTERATIONS): a Gaussian blur of 0.7, 1 or 1.5% of the width, the centre 70, 60 or 50% of
   each side in greyscale, a turn by 10, 15 or 20 degrees with black corners, one of these with an
   everyday edit, and two of these at once; they are also reported per family (blur, greycrop, rot,
   combined). `--width 300` first makes the originals small web pictures (300 pixels wide, JPEG);
   `--width full,300` runs both.
2. Categories. Every image whose label has at least one other member is a query; precision@10 is
   the share of its 10 nearest neighbours (itself and byte-identical copies excluded) that share
   its label, next to what random neighbours would give (chance).

Configurations are named. ``imgsim`` is the product itself: `Index.create`, `index.add(FOLDER)`,
`index.search` of each query's embedding through its HNSW graph, and `index.similar` of each category
query; ``imgsim+noexp``, ``imgsim+qe1_walk`` ... search it other ways (see PRODUCT_CONFIGS). Every other name is a variant computed here, from the
model's ``feature_map`` output and exact search, spelled as dash-separated parts:

    RESIZE SIZES   crop224 (shorter side to 256, centre 224: imgsim before), full224 (shorter side to
                   224, centre 224), squash224 (whole image to 224x224), pad224 (whole image into a
                   224 square, padded with the mean colour), aspect224 (shorter side 224, longer at
                   most 448, no crop); several sizes are averaged: squash224+320
    POOL           avg, max, gem3 (generalised mean, p = 3; any p: gem2.5)
    mirror         index vectors are the mean of the image's and its mirror's embeddings
    mirrorq        the same for queries too (twice the cost at query time)
    center         subtract the collection's mean vector (then L2-normalise again)
    white0.3       PCA-whitening learned from the collection, shrinkage 0.3 (eigenvalues + 0.3 x
                   their mean); this and `center` are skipped (noted) below --whiten-min images;
                   --learn-from FOLDER learns them from another folder instead
    bicubic        bicubic instead of the model's interpolation
    trim           cut plain-coloured margins (letterbox bars, a plain background, the white page
                   around clip-art) off every image before resizing
    rmac3          R-MAC regions (levels 1-3) of the feature map, each pooled and normalised, summed
    creg60         the centre 60% of the feature map pooled and summed with the whole map
    regmax3        index: R-MAC regions (levels 1-3) stored as separate vectors; an image scores by its best
    dbcentre60     index vectors: the mean of the whole image's and its centre 60%'s (queries unchanged);
                   dbgrey: of its greyscale copy; bothcentre60, bothgrey: queries too
    qmirror        query vectors: the mean of the query's and its mirror's (index unchanged)
    qunrot15       queries: the best score of the query as is and un-rotated by +-15 degrees
    qe2            query expansion: re-search with the mean of the query and its top 2 (category queries
                   leave themselves out)
    dba1           database-side augmentation: index vectors are the mean of themselves and their top 1

Timings are per image on this machine: decode + preprocess + inference for indexing (index ms) and
for one query (query ms); for ``imgsim`` the indexing figure is `SyncReport` seconds / image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from imgsim import Index
from imgsim import images as imgs
from imgsim.crops import CROP_VIEWS, DEFAULT_CROP_VIEWS
from imgsim.expand import Expansion
from imgsim.errors import ImageError
from imgsim.models import BUNDLED_MODEL, Model, available_cpus
from imgsim.models import regions as model_regions

PRODUCT_CONFIGS = {
    "imgsim": ((), DEFAULT_CROP_VIEWS),
    "imgsim-plain": ((), ()),
    "imgsim-crops": ((), CROP_VIEWS),
    "imgsim-colourcrops": ((), ("centre70", "centre50")),
    "imgsim-grey60": ((), ("grey60",)),
    "imgsim-grey70-60-50": ((), ("grey70", "grey60", "grey50")),
    "imgsim-crops60": ((), ("centre60",)),
    "imgsim-crops70-60-50": ((), ("centre70", "centre60", "centre50")),
    "imgsim-centre60": (("centre60",), ()),
}
"""The product itself, through `Index`, as (index views, crop views): as it indexes by default (one crop
view, the centre 60 % in grey seen sharp and blurred, ``soft60``, since the eighth step of issue 12;
``imgsim-grey60`` is the seventh step's, the sharp view alone); with
`imgsim index --no-centre-view` (``imgsim-plain``: no crop view, the default before); with
`imgsim index --centre-view` (``imgsim-crops``: crop views, the centre 70 % and 50 % in grey;
``imgsim-colourcrops``: in colour, as the first crop views were) and other crop views; and with the centre 60 % averaged into each image's vector (``imgsim-centre60``, what
`--centre-view` did before crop views).

Either name may end in ``+SEARCH``, how `Index.search` ranks (default: as the product does by default):
``+noexp`` (``expand=False``: by the query alone), ``+qe1`` (query expansion with the best match,
re-scoring the first walk's candidates; ``qe2``: the best two), with ``_`` separated options: ``walk`` (a second graph walk
instead), ``w0.5`` (the neighbour's weight), ``min0.5`` / ``max0.9`` (expand only when the best match
scores at least / below this); e.g. ``imgsim+qe1_w0.5_min0.3``; and ``noturn`` (alone or among those): a query that
looks turned onto a plain canvas is searched only as it is, not also turned back upright as the product does
(``imgsim+noturn``, ``imgsim-crops+noexp_noturn``). Configurations on the same index share one index and one
embedding of each query."""


def product_config(name: str) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], bool | Expansion, bool] | None:
    """((index views, crop views), `expand` argument, whether turned queries are also searched
    upright) of a product configuration name; None for a variant's name."""
    base, plus, how = name.partition("+")
    if base not in PRODUCT_CONFIGS:
        return None
    parts = how.split("_") if plus else []
    turn = "noturn" not in parts
    parts = [part for part in parts if part != "noturn"]
    if not parts:
        return PRODUCT_CONFIGS[base], True, turn
    if parts == ["noexp"]:
        return PRODUCT_CONFIGS[base], False, turn
    if not (first := re.fullmatch(r"qe(\d+)", parts[0])):
        raise ValueError(f"{name}: the search after + should be noexp, noturn or qeN[_OPTION...]")
    kwargs: dict = {"neighbours": int(first.group(1))}
    for part in parts[1:]:
        if part == "walk":
            kwargs["walk"] = True
        elif m := re.fullmatch(r"(w|min|max)(-?\d+(?:\.\d+)?)", part):
            kwargs[{"w": "weight", "min": "min_score", "max": "max_score"}[m.group(1)]] = float(m.group(2))
        else:
            raise ValueError(f"{name}: unknown search option {part!r}")
    return PRODUCT_CONFIGS[base], Expansion(**kwargs), turn

DEFAULT_CONFIGS = [
    "imgsim",
    "crop224-avg", "crop224-gem3",
    "full224-avg", "squash224-avg", "pad224-avg", "aspect224-avg",
    "squash224-gem3", "squash224-gem2", "squash224-max",
    "squash224-gem3-mirror",
    "squash224-gem3-center", "squash224-gem3-white1", "squash224-gem3-white10",
    "squash224-gem3-trim",
    "squash224-gem3-trim-center", "squash224-avg-trim-center", "pad224-gem3-trim-center",
    "squash224-gem3-trim-mirror-center", "squash224+320-gem3-trim-center",
]
BASELINE = "crop224-avg"
"""Plain average pooling of a centre crop: what the issue's category target is measured against."""


# -- the dataset -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One original. `group` is shared by byte-identical files; `label` is None outside any sub-folder."""

    path: Path
    key: str
    label: str | None
    group: int


def load_dataset(folder: Path, *, per_class: int | None = None, limit: int | None = None,
                 seed: int = 0, log: Callable[[str], None] | None = None) -> list[Item]:
    """The image files under `folder` with their labels, optionally a seeded sample of them.

    With `log`, files imgsim cannot decode are left out (and reported); without, none is opened."""
    by_label: dict[str | None, list[Path]] = defaultdict(list)
    for path in imgs.discover(folder):
        parts = path.relative_to(folder).parts
        by_label[parts[0] if len(parts) > 1 else None].append(path)
    chosen: list[Path] = []
    for label in sorted(by_label, key=lambda x: (x is None, x or "")):
        paths = by_label[label]
        if per_class and len(paths) > per_class:
            rng = np.random.default_rng([seed, _stable_hash(label or "")])
            paths = [paths[i] for i in sorted(rng.choice(len(paths), per_class, replace=False))]
        chosen.extend(paths)
    if limit and len(chosen) > limit:
        rng = np.random.default_rng(seed)
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), limit, replace=False))]
    groups: dict[str, int] = {}
    items = []
    for path in chosen:
        if log is not None:
            try:
                imgs.decode(path, min_side=32)
            except ImageError as e:
                log(f"skipping {path}: {e}")
                continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        key = path.relative_to(folder).as_posix()
        parts = path.relative_to(folder).parts
        items.append(Item(path, key, parts[0] if len(parts) > 1 else None, groups.setdefault(digest, len(groups))))
    return items


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# -- alterations: what people do to photos ------------------------------------------------------------

@dataclass
class Altered:
    image: Image.Image
    detail: str
    quality: int = 90
    exif_orientation: int | None = None


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def resize(img: Image.Image, rng: np.random.Generator) -> Altered:
    scale = max(_uniform(rng, 0.25, 0.6), min(1.0, 48 / min(img.size)))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    quality = int(rng.integers(70, 91))
    return Altered(img.resize(size, Image.Resampling.LANCZOS), f"x{scale:.2f} q{quality}", quality)


def jpeg(img: Image.Image, rng: np.random.Generator) -> Altered:
    quality = int(rng.integers(8, 21))
    return Altered(img, f"q{quality}", quality)


def _crop(lo: float, hi: float) -> Callable[[Image.Image, np.random.Generator], Altered]:
    def crop(img: Image.Image, rng: np.random.Generator) -> Altered:
        fw = _uniform(rng, lo, hi)
        fh = min(1.0, max(lo, fw * _uniform(rng, 0.9, 1.1)))
        cw, ch = max(1, round(img.width * fw)), max(1, round(img.height * fh))
        left = int(rng.integers(0, img.width - cw + 1))
        top = int(rng.integers(0, img.height - ch + 1))
        return Altered(img.crop((left, top, left + cw, top + ch)), f"{fw:.2f}x{fh:.2f} at {left},{top}")
    return crop


def grey(img: Image.Image, rng: np.random.Generator) -> Altered:
    return Altered(ImageOps.grayscale(img).convert("RGB"), "")


def mirror(img: Image.Image, rng: np.random.Generator) -> Altered:
    return Altered(ImageOps.mirror(img), "")


def rotate(img: Image.Image, rng: np.random.Generator, max_angle: float = 15.0) -> Altered:
    angle = _uniform(rng, 3, max_angle) * (1 if rng.random() < 0.5 else -1)
    fill = (0, 0, 0) if rng.random() < 0.7 else (255, 255, 255)
    out = img.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)
    return Altered(out, f"{angle:+.1f} deg, border {fill[0]}")


def blur(img: Image.Image, rng: np.random.Generator) -> Altered:
    radius = _uniform(rng, 0.005, 0.012) * max(img.size)
    return Altered(img.filter(ImageFilter.GaussianBlur(radius)), f"radius {radius:.1f}")


def brightness(img: Image.Image, rng: np.random.Generator) -> Altered:
    factor = _uniform(rng, 0.5, 0.75) if rng.random() < 0.5 else _uniform(rng, 1.3, 1.7)
    return Altered(ImageEnhance.Brightness(img).enhance(factor), f"x{factor:.2f}")


_WORDS = ["holiday", "2019", "best day ever", "look at this", "family", "summer", "for sale", "new!",
          "IMG_2041", "do not share", "(c) photo club", "lol", "weekend", "price: 12 EUR"]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, size))
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def caption(img: Image.Image, rng: np.random.Generator) -> Altered:
    share = _uniform(rng, 0.12, 0.22)
    band = max(8, round(img.height * share))
    dark = rng.random() < 0.7
    colour = (int(rng.integers(0, 40)),) * 3 if dark else (int(rng.integers(220, 256)),) * 3
    out = img.copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, img.height - band, img.width, img.height), fill=colour)
    text = " ".join(rng.choice(_WORDS, 2, replace=False))
    draw.text((max(2, img.width // 20), img.height - band + band // 5), text,
              fill=(255, 255, 255) if dark else (0, 0, 0), font=_font(round(band * 0.55)))
    return Altered(out, f"band {share:.2f}")


def letterbox(img: Image.Image, rng: np.random.Generator) -> Altered:
    factor = _uniform(rng, 1.3, 1.8)
    colour = (0, 0, 0) if rng.random() < 0.7 else (255, 255, 255)
    if rng.random() < 0.5:
        size, at, how = (img.width, round(img.height * factor)), (0, round(img.height * (factor - 1) / 2)), "rows"
    else:
        size, at, how = (round(img.width * factor), img.height), (round(img.width * (factor - 1) / 2), 0), "columns"
    out = Image.new("RGB", size, colour)
    out.paste(img, at)
    return Altered(out, f"{how} x{factor:.2f}, colour {colour[0]}")


def stretch(img: Image.Image, rng: np.random.Generator) -> Altered:
    factor = _uniform(rng, 1.25, 1.6)
    if rng.random() < 0.5:
        size, how = (round(img.width * factor), img.height), "wider"
    else:
        size, how = (img.width, round(img.height * factor)), "taller"
    return Altered(img.resize(size, Image.Resampling.BICUBIC), f"{how} x{factor:.2f}")


def paste_small(img: Image.Image, rng: np.random.Generator) -> Altered:
    canvas_scale = _uniform(rng, 1.0, 1.3)
    canvas = (round(img.width * canvas_scale), round(img.height * canvas_scale))
    share = _uniform(rng, 0.35, 0.6)
    scale = share * canvas_scale
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                       Image.Resampling.LANCZOS)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    out = Image.new("RGB", canvas, colour)
    at = (int(rng.integers(0, canvas[0] - small.width + 1)), int(rng.integers(0, canvas[1] - small.height + 1)))
    out.paste(small, at)
    return Altered(out, f"{share:.2f} of the canvas, colour {colour}")


_EXIF_TURNS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}


def exif_rotated(img: Image.Image, rng: np.random.Generator) -> Altered:
    """Pixels stored turned, with the EXIF orientation that turns them upright: a phone photo."""
    orientation = int(rng.choice(list(_EXIF_TURNS)))
    return Altered(img.transpose(_EXIF_TURNS[orientation]), f"orientation {orientation}",
                   exif_orientation=orientation)


def combo(img: Image.Image, rng: np.random.Generator) -> Altered:
    """Two or three everyday edits in a row, then a middling JPEG."""
    steps = {
        "resize": resize, "crop": _crop(0.8, 0.95), "grey": grey, "mirror": mirror,
        "rotate": lambda i, r: rotate(i, r, max_angle=8), "brightness": brightness, "caption": caption,
        "letterbox": letterbox, "stretch": stretch,
    }
    names = list(rng.choice(sorted(steps), int(rng.integers(2, 4)), replace=False))
    for name in names:
        img = steps[name](img, rng).image
    quality = int(rng.integers(30, 71))
    return Altered(img, "+".join(names) + f" q{quality}", quality)


ALTERATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Altered]] = {
    "resize": resize, "jpeg": jpeg, "crop90-75": _crop(0.75, 0.9), "crop75-60": _crop(0.6, 0.75),
    "grey": grey, "mirror": mirror, "rotate": rotate, "blur": blur, "brightness": brightness,
    "caption": caption, "letterbox": letterbox, "stretch": stretch, "paste-small": paste_small,
    "exif": exif_rotated, "combo": combo,
}
"""The everyday alterations: `--per-image` of them per image."""


# -- hard alterations: the three families that defeat a global descriptor on small pictures ----------

def _strong_blur(share: float) -> Callable[[Image.Image, np.random.Generator], Altered]:
    """Gaussian blur of radius `share` of the image's width (+-10 %)."""
    def strong_blur(img: Image.Image, rng: np.random.Generator) -> Altered:
        radius = share * _uniform(rng, 0.9, 1.1) * img.width
        return Altered(img.filter(ImageFilter.GaussianBlur(radius)), f"radius {radius:.1f}")
    return strong_blur


def _centre_crop(share: float, img: Image.Image) -> Image.Image:
    cw, ch = max(1, round(img.width * share)), max(1, round(img.height * share))
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _grey_crop(share: float) -> Callable[[Image.Image, np.random.Generator], Altered]:
    """The centre `share` of each side, in greyscale."""
    def grey_crop(img: Image.Image, rng: np.random.Generator) -> Altered:
        return Altered(ImageOps.grayscale(_centre_crop(share, img)).convert("RGB"), f"centre {share:.2f}")
    return grey_crop


def _black_rotation(degrees: float) -> Callable[[Image.Image, np.random.Generator], Altered]:
    """Rotated by `degrees` either way, the canvas grown to hold it all, black in the corners."""
    def black_rotation(img: Image.Image, rng: np.random.Generator) -> Altered:
        angle = degrees * (1 if rng.random() < 0.5 else -1)
        return Altered(img.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0)),
                       f"{angle:+.0f} deg")
    return black_rotation


_HARD_MIDDLE = {"blur": _strong_blur(0.01), "greycrop": _grey_crop(0.6), "rot": _black_rotation(15)}


def hard_plus_everyday(img: Image.Image, rng: np.random.Generator) -> Altered:
    """One hard alteration (middle strength) and one everyday edit, in random order, then a middling JPEG."""
    hard = str(rng.choice(sorted(_HARD_MIDDLE)))
    everyday = {"resize": resize, "crop": _crop(0.8, 0.95), "mirror": mirror, "brightness": brightness,
                "caption": caption, "letterbox": letterbox, "stretch": stretch}
    edit = str(rng.choice(sorted(everyday)))
    steps = [(hard, _HARD_MIDDLE[hard]), (edit, everyday[edit])]
    if rng.random() < 0.5:
        steps.reverse()
    for _, step in steps:
        img = step(img, rng).image
    quality = int(rng.integers(40, 81))
    return Altered(img, "+".join(name for name, _ in steps) + f" q{quality}", quality)


def hard_pair(img: Image.Image, rng: np.random.Generator) -> Altered:
    """Two of the hard alterations (middle strength), then a middling JPEG."""
    names = sorted(str(n) for n in rng.choice(sorted(_HARD_MIDDLE), 2, replace=False))
    for name in names:
        img = _HARD_MIDDLE[name](img, rng).image
    quality = int(rng.integers(40, 81))
    return Altered(img, "+".join(names) + f" q{quality}", quality)


HARD_ALTERATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Altered]] = {
    "blur-0.7": _strong_blur(0.007), "blur-1.0": _strong_blur(0.01), "blur-1.5": _strong_blur(0.015),
    "greycrop-70": _grey_crop(0.7), "greycrop-60": _grey_crop(0.6), "greycrop-50": _grey_crop(0.5),
    "rot-10": _black_rotation(10), "rot-15": _black_rotation(15), "rot-20": _black_rotation(20),
    "hard+everyday": hard_plus_everyday, "hard+hard": hard_pair,
}
"""The hard alterations at several strengths (blur radius as a share of the width, the share of each side
kept, degrees): every one on every image (`--hard`). Families are the part before the dash."""

ALL_ALTERATIONS = {**ALTERATIONS, **HARD_ALTERATIONS}


def family(kind: str) -> str:
    """A hard alteration's family (blur, greycrop, rot, combined), or the everyday kind itself."""
    if kind.startswith("hard+"):
        return "combined"
    return kind.split("-")[0] if kind in HARD_ALTERATIONS else kind


@dataclass(frozen=True)
class Query:
    path: Path
    source: int
    kind: str
    detail: str


def make_queries(items: Sequence[Item], out: Path, *, per_image: int | None, seed: int,
                 kinds: Sequence[str] | None = None, hard: Sequence[str] = (),
                 log: Callable[[str], None] = lambda s: None) -> list[Query]:
    """Write the altered copies of every item to `out` as JPEG files: `per_image` of the everyday
    `kinds` (None: every one), and every one of the `hard` kinds.

    The kinds and their parameters depend only on the seed and the item's relative path, so a
    smaller run (--limit, --per-class) alters each image exactly as the full run does."""
    kinds = list(kinds or ALTERATIONS)
    out.mkdir(parents=True, exist_ok=True)
    queries = []
    for i, item in enumerate(items):
        try:
            original = imgs.decode(item.path).image
        except ImageError as e:
            log(f"skipping {item.path}: {e}")
            continue
        h = _stable_hash(item.key)
        chosen = kinds if per_image is None else list(
            np.random.default_rng([seed, h]).choice(kinds, min(per_image, len(kinds)), replace=False))
        for kind in list(chosen) + list(hard):
            rng = np.random.default_rng([seed, h, _stable_hash(kind)])
            altered = ALL_ALTERATIONS[kind](original, rng)
            path = out / f"{i:05d}-{kind}.jpg"
            save_jpeg(altered, path)
            queries.append(Query(path, i, kind, altered.detail))
    return queries


def at_most_wide(img: Image.Image, width: int) -> Image.Image:
    """`img` made `width` pixels wide (Lanczos) if it is wider, as it is otherwise."""
    if img.width <= width:
        return img
    return img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS)


def shrink_originals(items: Sequence[Item], width: int, out: Path) -> list[Item]:
    """The originals as small web pictures: `width` pixels wide (Lanczos, never enlarged), JPEG quality 90,
    in the same label folders. Keys keep the original's name, so alterations stay seeded alike."""
    small = []
    for it in items:
        img = at_most_wide(imgs.decode(it.path).image, width)
        path = out / Path(it.key).with_suffix(".jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=90)
        small.append(Item(path, it.key, it.label, it.group))
    return small


def save_jpeg(altered: Altered, path: Path) -> None:
    kwargs = {"quality": altered.quality}
    if altered.exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = altered.exif_orientation
        kwargs["exif"] = exif
    altered.image.convert("RGB").save(path, "JPEG", **kwargs)


# -- metrics -----------------------------------------------------------------------------------------

@dataclass
class Result:
    config: str
    nd_recall_at_1: float
    nd_map: float
    category_p_at_10: float
    chance_p_at_10: float
    index_ms: float
    query_ms: float
    per_alteration: dict[str, float]
    note: str = ""
    misses: list[dict] = field(default_factory=list)
    original_score: dict[str, float] = field(default_factory=dict)
    per_alteration_map: dict[str, float] = field(default_factory=dict)

    def to_dict(self, with_misses: bool = False) -> dict:
        data = {
            "config": self.config,
            "nd_recall_at_1": _number(self.nd_recall_at_1),
            "nd_map": _number(self.nd_map),
            "category_p_at_10": _number(self.category_p_at_10),
            "chance_p_at_10": _number(self.chance_p_at_10),
            "index_ms_per_image": _number(self.index_ms, 2),
            "query_ms_per_image": _number(self.query_ms, 2),
            "per_alteration_recall_at_1": {k: _number(v) for k, v in self.per_alteration.items()},
            "per_alteration_original_score": {k: _number(v) for k, v in self.original_score.items()},
            "per_alteration_map": {k: _number(v) for k, v in self.per_alteration_map.items()},
            "note": self.note,
        }
        if with_misses:
            data["misses"] = self.misses
        return data


def _number(value: float, digits: int = 4) -> float | None:
    """Rounded, with None for NaN (no category queries, no timing) so that the JSON is strict."""
    return None if math.isnan(value) else round(value, digits)


def category_queries(items: Sequence[Item]) -> tuple[list[int], float]:
    """Items that have another image of their label (not a copy of themselves), and chance P@10."""
    n = len(items)
    group_size = defaultdict(int)
    for it in items:
        group_size[it.group] += 1
    per_label = defaultdict(int)
    for it in items:
        per_label[it.label] += 1
    chosen, chance = [], []
    for i, it in enumerate(items):
        if it.label is None:
            continue
        same_label_groups = {other.group for other in items if other.label == it.label} - {it.group}
        if not same_label_groups:
            continue
        others_same_label = sum(1 for other in items if other.label == it.label and other.group != it.group)
        chosen.append(i)
        chance.append(others_same_label / (n - group_size[it.group]))
    return chosen, float(np.mean(chance)) if chance else float("nan")


def score_rankings(config: str, items: Sequence[Item], queries: Sequence[Query], nd_rankings: Sequence[np.ndarray],
                   cat_queries: Sequence[int], cat_rankings: Sequence[np.ndarray], chance: float,
                   index_ms: float, query_ms: float, note: str = "",
                   nd_scores: Sequence[np.ndarray] | None = None) -> Result:
    """Metrics from ranked item indices: one ranking per query, one per category query (self excluded).

    `nd_scores`, aligned with `nd_rankings`, gives each query's similarity to its original (the
    first relevant item; NaN where it was not returned), averaged per alteration."""
    groups = np.array([it.group for it in items])
    hits, aps = [], []
    per_kind: dict[str, list[bool]] = defaultdict(list)
    per_kind_ap: dict[str, list[float]] = defaultdict(list)
    original_scores: dict[str, list[float]] = defaultdict(list)
    misses = []
    for n, (q, ranking) in enumerate(zip(queries, nd_rankings)):
        relevant = groups[ranking] == items[q.source].group
        n_relevant = int((groups == items[q.source].group).sum())
        positions = np.flatnonzero(relevant)
        ap = float(np.sum(np.arange(1, len(positions) + 1) / (positions + 1)) / n_relevant)
        hit = bool(len(ranking) and relevant[0])
        hits.append(hit)
        aps.append(ap)
        per_kind[q.kind].append(hit)
        per_kind_ap[q.kind].append(ap)
        if nd_scores is not None:
            original_scores[q.kind].append(float(nd_scores[n][positions[0]]) if len(positions) else math.nan)
        if not hit:
            first = int(positions[0]) + 1 if len(positions) else None
            misses.append({"query": q.path.name, "original": items[q.source].key, "kind": q.kind, "detail": q.detail,
                           "top1": items[int(ranking[0])].key if len(ranking) else None, "rank_of_original": first})
    labels = [it.label for it in items]
    precisions = []
    for i, ranking in zip(cat_queries, cat_rankings):
        top = ranking[:10]
        precisions.append(sum(labels[j] == labels[i] for j in top) / 10)
    kinds = [k for k in ALL_ALTERATIONS if k in per_kind] + sorted(set(per_kind) - set(ALL_ALTERATIONS))
    return Result(config, float(np.mean(hits)) if hits else math.nan, float(np.mean(aps)) if aps else math.nan,
                  float(np.mean(precisions)) if precisions else float("nan"), chance, index_ms, query_ms,
                  {k: float(np.mean(per_kind[k])) for k in kinds}, note, misses,
                  {k: float(np.nanmean(original_scores[k])) if not np.isnan(original_scores[k]).all() else math.nan
                   for k in kinds if k in original_scores},
                  {k: float(np.mean(per_kind_ap[k])) for k in kinds})


# -- imgsim itself -----------------------------------------------------------------------------------

def evaluate_products(folder: Path, items: Sequence[Item], queries: Sequence[Query], cat_queries: Sequence[int],
                      chance: float, names: Sequence[str], *, model: str, work_dir: Path,
                      index_path: Path | None, log: Callable[[str], None]) -> list[Result]:
    """The real product: an `Index` built over `folder` for each set of index views (see
    PRODUCT_CONFIGS; `index_path` for the default views), every query file embedded once by it, and
    searched by each configuration's `Index.search`. Category queries are `Index.similar` of the item
    (the image itself left out, as from "more like this")."""
    by_path = {it.path.resolve(): i for i, it in enumerate(items)}
    group_sizes = defaultdict(int)
    for it in items:
        group_sizes[it.group] += 1
    by_views: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = defaultdict(list)
    for name in names:
        by_views[product_config(name)[0]].append(name)
    results = []
    for (views, crop_views), members in by_views.items():
        default = (views, crop_views) == PRODUCT_CONFIGS["imgsim"]
        target = index_path if index_path and default else work_dir / f"index-{members[0].partition('+')[0]}"
        log(f"{', '.join(members)}: indexing and searching through Index")
        exists = target.with_name(target.name + ".sqlite").exists()
        note = ""
        if exists:
            index = Index.open(target, read_only=True)
            note = f"existing index {target}; "
            index_ms = float("nan")
        else:
            index = Index.create(target, model=model, root=folder, index_views=views, crop_views=crop_views)
            report = index.add([it.path for it in items])
            index_ms = 1000 * report.seconds / max(1, report.embedded)
            if report.failed:
                log(f"imgsim: {report.failed} files failed to index")
        with index:
            k = min(len(index), 100)

            item_of = {rec["id"]: by_path.get(Path(rec["abspath"]).resolve()) for rec in index.images()}

            def ranked(results) -> tuple[np.ndarray, np.ndarray]:
                found = [(item_of.get(r.id), r.score) for r in results]
                found = [(i, score) for i, score in found if i is not None]
                return (np.array([i for i, _ in found], dtype=np.int64),
                        np.array([s for _, s in found], dtype=np.float64))

            started = time.perf_counter()
            vectors = [index.query_vectors(q.path) for q in queries]  # a turned one: as is, then upright
            embed_ms = 1000 * (time.perf_counter() - started) / len(queries) if queries else math.nan
            prep = index.info()["preprocess"]
            shown = ", ".join(f"{key} {value}" for key, value in prep.items() if key not in ("mean", "std"))
            for name in members:
                _, expand, turn = product_config(name)
                started = time.perf_counter()
                found = [index.search(v if turn else v[0], k=k, expand=expand) for v in vectors]
                search_ms = 1000 * (time.perf_counter() - started) / len(queries) if queries else math.nan
                nd, nd_scores = zip(*(ranked(r) for r in found)) if queries else ((), ())
                cat = []
                for i in cat_queries:
                    wanted = max(1, min(len(index) - 1, 10 + group_sizes[items[i].group]))
                    ranking, _ = ranked(index.similar(items[i].path, k=wanted, expand=expand))
                    cat.append(np.array([j for j in ranking if items[j].group != items[i].group], dtype=np.int64))
                how = "expanded" if expand is True else ("by the query alone" if expand is False else f"{expand}")
                results.append(score_rankings(
                    name, items, queries, nd, cat_queries, cat, chance, index_ms, embed_ms + search_ms,
                    note + f"{shown}; HNSW, top {k}; ranked {how}; search {search_ms:.2f} ms", nd_scores))
    return results


# -- the variants ------------------------------------------------------------------------------------

_RESIZE_MODES = ("crop", "full", "squash", "pad", "aspect")


class Pass(NamedTuple):
    """One run of the model over a set of images: how they are prepared. `transform` is "" (as is),
    "mirror", or "unrot+D" / "unrot-D" (undo a rotation by +-D degrees: see `unrotate`)."""

    resize: str
    size: int
    transform: str
    interpolation: str | None
    trim: bool


def unrotate(img: Image.Image, degrees: float) -> Image.Image:
    """Undo `img.rotate(degrees, expand=True)`: turn back and cut out the upright picture's rectangle.

    The guess is wrong for most queries; `qmaxD` therefore keeps the best score of the query as is and
    of both guesses."""
    rad = math.radians(abs(degrees))
    c, s = math.cos(rad), math.sin(rad)
    det = c * c - s * s
    w = (c * img.width - s * img.height) / det
    h = (c * img.height - s * img.width) / det
    back = img.rotate(-degrees, Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    if w < 8 or h < 8:
        return img.rotate(-degrees, Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))
    left, top = (back.width - w) / 2, (back.height - h) / 2
    return back.crop((round(left), round(top), round(left + w), round(top + h)))


@dataclass(frozen=True)
class Config:
    """A variant of imgsim's embedding, parsed from its name (see the module docstring)."""

    name: str
    resize: str
    sizes: tuple[int, ...]
    pool: float  # 1: average, inf: max, else the GeM exponent
    mirror: str = ""  # "", "index" or "both"
    whiten: float | None = None  # shrinkage; inf: only subtract the mean
    interpolation: str | None = None  # None: the model's
    trim: bool = False
    regions: int = 0  # R-MAC levels summed into the vector (0: the whole map only)
    centre_region: int = 0  # percent of each side of the map: that centre region's vector summed in too
    region_max: int = 0  # R-MAC levels stored as separate index vectors, best one scores (0: none)
    query_mirror: bool = False  # queries: the mean of the query's and its mirror's vectors
    query_unrotate: float = 0.0  # queries: the best of as-is and un-rotated by +-this many degrees
    query_expansion: int = 0  # queries: re-searched with the mean of themselves and their top k
    db_augmentation: int = 0  # index vectors: the mean of themselves and their top k neighbours
    extra: tuple[tuple[str, str], ...] = ()  # (side "db" or "both", transform) averaged in too

    @classmethod
    def parse(cls, name: str) -> Config:
        parts = name.split("-")
        m = re.fullmatch(rf"({'|'.join(_RESIZE_MODES)})(\d+(?:\+\d+)*)", parts[0])
        if not m:
            raise ValueError(f"{name}: should start with one of {', '.join(_RESIZE_MODES)} and sizes, e.g. crop224")
        kwargs: dict = {"resize": m.group(1), "sizes": tuple(int(s) for s in m.group(2).split("+")), "pool": 1.0}
        for part in parts[1:]:
            if part == "avg":
                kwargs["pool"] = 1.0
            elif part == "max":
                kwargs["pool"] = math.inf
            elif g := re.fullmatch(r"gem(\d+(?:\.\d+)?)", part):
                kwargs["pool"] = float(g.group(1))
            elif part == "mirror":
                kwargs["mirror"] = "index"
            elif part == "mirrorq":
                kwargs["mirror"] = "both"
            elif part == "center":
                kwargs["whiten"] = math.inf
            elif w := re.fullmatch(r"white(\d+(?:\.\d+)?)", part):
                kwargs["whiten"] = float(w.group(1))
            elif part in ("bilinear", "bicubic"):
                kwargs["interpolation"] = part
            elif part == "trim":
                kwargs["trim"] = True
            elif r := re.fullmatch(r"creg(\d\d)", part):
                kwargs["centre_region"] = int(r.group(1))
            elif r := re.fullmatch(r"rmac(\d)", part):
                kwargs["regions"] = int(r.group(1))
            elif r := re.fullmatch(r"regmax(\d)", part):
                kwargs["region_max"] = int(r.group(1))
            elif part == "qmirror":
                kwargs["query_mirror"] = True
            elif r := re.fullmatch(r"qunrot(\d+)", part):
                kwargs["query_unrotate"] = float(r.group(1))
            elif r := re.fullmatch(r"qe(\d+)", part):
                kwargs["query_expansion"] = int(r.group(1))
            elif r := re.fullmatch(r"dba(\d+)", part):
                kwargs["db_augmentation"] = int(r.group(1))
            elif r := re.fullmatch(r"(db|both)(grey|centre\d\d)", part):
                kwargs["extra"] = kwargs.get("extra", ()) + ((r.group(1), r.group(2)),)
            else:
                raise ValueError(f"{name}: unknown part {part!r}")
        return cls(name, **kwargs)

    def groups(self, side: str) -> list[list[str]]:
        """The transforms of `side` ("db", "learn" or "q"): each group's vectors are averaged into one
        vector; several groups (`qunrot`) are scored by the best of them."""
        if side != "q":
            return [(["", "mirror"] if self.mirror else [""]) + [t for _, t in self.extra]]
        first = [""] + (["mirror"] if self.mirror == "both" or self.query_mirror else [])
        first += [t for where, t in self.extra if where == "both"]
        if not self.query_unrotate:
            return [first]
        d = f"{self.query_unrotate:g}"
        return [first, [f"unrot+{d}"], [f"unrot-{d}"]]

    def passes(self, side: str) -> list[Pass]:
        """The model runs that `side` needs."""
        return [Pass(self.resize, s, t, self.interpolation, self.trim)
                for s in self.sizes for g in self.groups(side) for t in g]

    @property
    def pool_key(self) -> tuple[float, int, int]:
        return self.pool, self.regions, self.centre_region


def rmac_regions(h: int, w: int, levels: int) -> list[tuple[int, int, int, int]]:
    """The whole map and R-MAC regions at levels 2..`levels`: the product's own `imgsim.models.regions`."""
    return model_regions(h, w, levels)


class FeatureModel:
    """The catalogue model run for its ``feature_map`` (or only its ``embedding``) output."""

    def __init__(self, name: str):
        import onnxruntime as ort

        self.model = Model.load(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.model.path), options, providers=["CPUExecutionProvider"])
        self.has_feature_map = "feature_map" in {o.name for o in self.session.get_outputs()}
        # a model whose descriptor is its graph's own `embedding` (efficientnet-lite0-lw's learned
        # whitening) has a feature map without it: variants pooled from that map are the backbone's
        self.head_skipped = (f"pooled from {name}'s feature map, without its own head (its backbone's figures)"
                             if self.model.spec.pooling == "avg" and self.has_feature_map else "")

    def preprocess(self, p: Pass) -> imgs.Preprocess:
        base = self.model.preprocess
        # crop: the classic ImageNet evaluation crop (shorter side 256 for 224), whatever imgsim does now
        resize_to = round(p.size * 256 / 224) if p.resize == "crop" else p.size
        return imgs.Preprocess(size=p.size, resize_to=resize_to,
                               resize="crop" if p.resize in ("crop", "full") else p.resize,
                               interpolation=p.interpolation or base.interpolation, mean=base.mean, std=base.std)

    def to_array(self, img: Image.Image, p: Pass) -> np.ndarray:
        prep = self.preprocess(p)
        if p.transform == "mirror":
            img = ImageOps.mirror(img)
        elif p.transform == "grey":
            img = ImageOps.grayscale(img).convert("RGB")
        elif p.transform.startswith("centre"):
            img = _centre_crop(int(p.transform[6:]) / 100, img)
        elif p.transform.startswith("unrot"):
            img = unrotate(img, float(p.transform[5:]))
        if p.trim:
            img = imgs.trim_plain_borders(img)
        if p.resize in ("crop", "full", "squash"):
            return imgs.to_array(img, prep)
        resample = imgs._RESAMPLE[prep.interpolation]
        scale = p.size / (max(img.size) if p.resize == "pad" else min(img.size))
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        img = img.resize((w, h), resample, reducing_gap=3.0)
        if p.resize == "pad":
            canvas = Image.new("RGB", (p.size, p.size), tuple(round(m * 255) for m in prep.mean))
            canvas.paste(img, ((p.size - w) // 2, (p.size - h) // 2))
            img = canvas
        elif max(w, h) > 2 * p.size:  # aspect: keep very long images bounded
            cw, ch = min(w, 2 * p.size), min(h, 2 * p.size)
            img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        pixels = np.asarray(img, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def pooled(self, batch: np.ndarray, keys: set[tuple[float, int]],
               region_levels: int = 0) -> tuple[dict[tuple[float, int], np.ndarray], dict[float, np.ndarray]]:
        """{(pool, R-MAC levels, centre region %): (N, C)} vectors, and for `region_levels` {pool: (N, R, C)} region vectors."""
        if not self.has_feature_map:
            if {k for k in keys if k != (1.0, 0, 0)} or region_levels:
                raise SystemExit(f"{self.model.name} has no feature_map output: only avg pooling can be evaluated")
            (emb,) = self.session.run(["embedding"], {"input": batch})
            return {(1.0, 0, 0): emb.reshape(len(batch), -1)}, {}
        (fmap,) = self.session.run(["feature_map"], {"input": batch})

        def pool(x: np.ndarray, p: float) -> np.ndarray:
            if p == 1.0:
                return x.mean(axis=(2, 3))
            if math.isinf(p):
                return x.max(axis=(2, 3))
            return np.power(np.power(np.maximum(x, 1e-6), p).mean(axis=(2, 3)), 1.0 / p)

        h, w = fmap.shape[2:]
        out = {}
        for p, levels, centre in keys:
            if not levels and not centre:
                out[(p, levels, centre)] = pool(fmap, p)
                continue
            boxes = model_regions(h, w, levels, centre)
            regions = [normalize(pool(fmap[:, :, t:t + rh, lf:lf + rw], p)) for t, lf, rh, rw in boxes]
            out[(p, levels, centre)] = np.sum(regions, axis=0)
        stored = {}
        if region_levels:
            for p in {k[0] for k in keys}:
                stored[p] = np.stack([pool(fmap[:, :, t:t + rh, lf:lf + rw], p)
                                      for t, lf, rh, rw in rmac_regions(h, w, region_levels)], axis=1)
        return out, stored


def normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def learn_whitening(db: np.ndarray, shrinkage: float) -> Callable[[np.ndarray], np.ndarray]:
    """PCA-whitening with shrinkage, learned from a collection's own vectors.

    The covariance C = U diag(l) U' gets `shrinkage` x mean(l) added to every eigenvalue (so
    directions the collection barely spans are not blown up), and vectors are mapped by
    (C + eta I)^(-1/2), scaled so the unseen directions keep their length. Infinite shrinkage is
    plain centring.
    """
    mean = db.mean(axis=0)
    if math.isinf(shrinkage):
        return lambda x: normalize(x - mean)
    _, s, vt = np.linalg.svd(db - mean, full_matrices=False)
    eig = s ** 2 / max(1, len(db) - 1)
    keep = eig > 1e-9 * eig.max()
    u, eig = vt[keep].T, eig[keep]
    eta = shrinkage * eig.mean()
    shrink = 1.0 - np.sqrt(eta / (eig + eta))  # per component: how much of it to take away

    def apply(x: np.ndarray) -> np.ndarray:
        r = x - mean
        return normalize(r - ((r @ u) * shrink) @ u.T)
    return apply


def evaluate_variants(configs: Sequence[Config], items: Sequence[Item], queries: Sequence[Query],
                      cat_queries: Sequence[int], chance: float, *, model: str, whiten_min: int,
                      batch_size: int, learn_from: Sequence[Path] = (),
                      log: Callable[[str], None]) -> list[Result]:
    """All variants from shared model runs: one run per `Pass` and side.

    Sides: "db" (the collection), "q" (the altered copies) and "learn" (`learn_from`, the images
    the centring and whitening are learned from when not the collection itself)."""
    fm = FeatureModel(model)
    if fm.head_skipped:
        log(f"note: variants are {fm.head_skipped}")
    needs: dict[Pass, dict[str, set]] = defaultdict(lambda: {"db": set(), "q": set(), "learn": set()})
    region_levels: dict[Pass, int] = defaultdict(int)
    for c in configs:
        for side in ("db", "q") + (("learn",) if learn_from and c.whiten is not None else ()):
            for p in c.passes(side):
                needs[p][side].add(c.pool_key)
                if side == "db" and c.region_max:
                    needs[p][side].add((c.pool, 0, 0))
                    region_levels[p] = max(region_levels[p], c.region_max)
    files = {"db": [it.path for it in items], "q": [q.path for q in queries], "learn": list(learn_from)}
    pooled: dict[Pass, dict[str, dict]] = defaultdict(dict)
    stored: dict[Pass, dict[float, np.ndarray]] = {}
    ms: dict[Pass, dict[str, float]] = defaultdict(dict)
    decode_ms: dict[int, dict[str, float]] = defaultdict(dict)
    by_decode = defaultdict(list)
    for p in needs:
        by_decode[fm.preprocess(p).decode_size].append(p)
    for min_side, passes in sorted(by_decode.items()):
        for side in ("db", "q", "learn"):
            wanted = [p for p in passes if needs[p][side]]
            if not wanted or not files[side]:
                continue
            started = time.perf_counter()
            decoded = [imgs.decode(path, min_side).image for path in files[side]]
            decode_ms[min_side][side] = 1000 * (time.perf_counter() - started) / len(decoded)
            for p in wanted:
                log(f"  {side}: {p.resize}{p.size} {p.transform}{' trimmed' if p.trim else ''}"
                    f"{' ' + p.interpolation if p.interpolation else ''} ({len(decoded)} images)")
                started = time.perf_counter()
                chunks: dict = defaultdict(list)
                region_chunks: dict = defaultdict(list)
                step = 1 if p.resize == "aspect" else batch_size
                levels = region_levels[p] if side == "db" else 0
                for start in range(0, len(decoded), step):
                    arrays = np.stack([fm.to_array(im, p) for im in decoded[start:start + step]])
                    vecs, regions = fm.pooled(arrays, needs[p][side], levels)
                    for key, v in vecs.items():
                        chunks[key].append(v)
                    for key, v in regions.items():
                        region_chunks[key].append(v)
                pooled[p][side] = {key: np.concatenate(v) for key, v in chunks.items()}
                if region_chunks:
                    stored[p] = {key: np.concatenate(v) for key, v in region_chunks.items()}
                ms[p][side] = 1000 * (time.perf_counter() - started) / len(decoded)
            del decoded

    def vectors(c: Config, side: str, group: Sequence[str]) -> np.ndarray:
        per_scale = []
        for size in c.sizes:
            runs = [Pass(c.resize, size, t, c.interpolation, c.trim) for t in group]
            per_scale.append(normalize(np.sum([normalize(pooled[p][side][c.pool_key]) for p in runs], axis=0)))
        return normalize(np.sum(per_scale, axis=0))

    def region_vectors(c: Config) -> np.ndarray:
        """(N, R, C): the stored regions of every index image, averaged over scales like `vectors`."""
        per_scale = []
        for size in c.sizes:
            p = Pass(c.resize, size, "", c.interpolation, c.trim)
            per_scale.append(stored[p][c.pool][:, :len(rmac_regions(7, 7, c.region_max))])
        x = np.sum([v / np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-12) for v in per_scale], axis=0)
        return x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)

    def cost(c: Config, side: str) -> float:
        if not files[side]:
            return math.nan
        runs = c.passes(side)
        return decode_ms[max(fm.preprocess(p).decode_size for p in runs)][side] + sum(ms[p][side] for p in runs)

    groups = np.array([it.group for it in items])
    results = []
    for c in configs:
        db = vectors(c, "db", c.groups("db")[0])
        qs = [vectors(c, "q", g) if files["q"] else np.empty((0, db.shape[1]), np.float32) for g in c.groups("q")]
        regions = region_vectors(c) if c.region_max else None
        note = ""
        if c.whiten is not None:
            source = vectors(c, "learn", [""]) if learn_from else db
            if len(source) >= whiten_min:
                apply = learn_whitening(source, c.whiten)
                db, qs = apply(db), [apply(q) for q in qs]
                if regions is not None:
                    regions = apply(regions.reshape(-1, regions.shape[2])).reshape(regions.shape)
                note = f"learned from {len(source)} images of --learn-from" if learn_from else ""
            else:
                note = f"not centred or whitened: {len(source)} images < --whiten-min {whiten_min}"
        db_plain = db
        if c.db_augmentation:
            db = augment(db, db, c.db_augmentation)

        def score(q: np.ndarray) -> np.ndarray:
            if regions is None:
                return q @ db.T
            return np.max(np.einsum("qc,nrc->qnr", q, regions), axis=2)

        nd_scores = np.max([score(q) for q in qs], axis=0) if len(qs[0]) else np.empty((0, len(db)))
        if c.query_expansion and len(nd_scores):
            nd_scores = expand_queries(qs[0], nd_scores, db, c.query_expansion) @ db.T
        nd = [np.argsort(-row, kind="stable") for row in nd_scores]
        ranked_scores = [row[order] for row, order in zip(nd_scores, nd)]
        cat = []
        cat_scores = score(db_plain[list(cat_queries)]) if cat_queries else np.empty((0, len(db)))
        if c.query_expansion and len(cat_scores):
            own = np.array([[groups[j] == items[i].group for j in range(len(items))] for i in cat_queries])
            cat_scores = expand_queries(db_plain[list(cat_queries)], np.where(own, -np.inf, cat_scores), db,
                                        c.query_expansion) @ db.T
        for i, row in zip(cat_queries, cat_scores):
            order = np.argsort(-row, kind="stable")
            cat.append(order[groups[order] != items[i].group])
        note = "; ".join(n for n in (fm.head_skipped, note) if n)
        results.append(score_rankings(c.name, items, queries, nd, cat_queries, cat, chance,
                                      cost(c, "db"), cost(c, "q"), note, ranked_scores))
    return results


def expand_queries(q: np.ndarray, scores: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """Average query expansion (Chum et al., 2007): each query plus its `k` best index vectors."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return normalize(q + db[top].sum(axis=1))


def augment(db: np.ndarray, source: np.ndarray, k: int) -> np.ndarray:
    """Database-side augmentation (Arandjelovic & Zisserman, 2012): every vector plus its `k` nearest
    other vectors of `source` (the collection)."""
    sims = db @ source.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return normalize(db + source[top].sum(axis=1))


# -- running and reporting ---------------------------------------------------------------------------

def run(folder: str | os.PathLike, *, configs: Sequence[str] = DEFAULT_CONFIGS, model: str = BUNDLED_MODEL,
        index_path: str | os.PathLike | None = None, per_image: int | None = 2, per_class: int | None = None,
        limit: int | None = None, seed: int = 0, whiten_min: int = 200, batch_size: int = 16,
        work: str | os.PathLike | None = None, kinds: Sequence[str] | None = None, hard: Sequence[str] = (),
        width: int | None = None, learn_from: str | os.PathLike | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the whole evaluation; return the report as plain data (what --json prints).

    `hard`: the HARD_ALTERATIONS made of every image besides its `per_image` everyday ones.
    `width`: the originals are first made small web pictures that wide (`shrink_originals`)."""
    folder = Path(folder).resolve()
    parsed = [None if product_config(name) else Config.parse(name) for name in configs]
    started = time.perf_counter()
    items = load_dataset(folder, per_class=per_class, limit=limit, seed=seed, log=log)
    if len(items) < 2:
        raise SystemExit(f"{folder}: need at least 2 images, found {len(items)}")
    own_work = work is None
    work_dir = Path(tempfile.mkdtemp(prefix="imgsim-eval-")) if own_work else Path(work)
    try:
        if width:
            folder = (work_dir / f"originals-{width}").resolve()
            items = shrink_originals(items, width, folder)
            log(f"originals made {width} pixels wide in {folder}")
        log(f"{len(items)} images; writing altered copies to {work_dir / 'queries'}")
        queries = make_queries(items, work_dir / "queries", per_image=per_image, seed=seed, kinds=kinds,
                               hard=hard, log=log)
        cat_queries, chance = category_queries(items)
        results: list[Result] = []
        products = [c for c in configs if product_config(c)]
        if products:
            results.extend(evaluate_products(folder, items, queries, cat_queries, chance, products, model=model,
                                             work_dir=work_dir, log=log,
                                             index_path=Path(index_path) if index_path else None))
        variants = [c for c in parsed if c is not None]
        if variants:
            log(f"{len(variants)} variants")
            results.extend(evaluate_variants(variants, items, queries, cat_queries, chance, model=model,
                                             whiten_min=whiten_min, batch_size=batch_size, log=log,
                                             learn_from=list(imgs.discover(learn_from)) if learn_from else ()))
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    order = {name: i for i, name in enumerate(configs)}
    results.sort(key=lambda r: order[r.config])
    kind_counts = defaultdict(int)
    for q in queries:
        kind_counts[q.kind] += 1
    return {
        "folder": str(folder),
        "width": width,
        "model": model,
        "seed": seed,
        "images": len(items),
        "labels": len({it.label for it in items if it.label is not None}),
        "category_queries": len(cat_queries),
        "near_duplicate_queries": len(queries),
        "queries_per_alteration": dict(kind_counts),
        "seconds": round(time.perf_counter() - started, 1),
        "results": [r.to_dict(with_misses=True) for r in results],
    }


def format_report(report: dict) -> str:
    base = next((r for r in report["results"] if r["config"] == BASELINE), None)
    lines = [
        (f"{report['folder']}{' at ' + str(report['width']) + ' px wide' if report.get('width') else ''}: "
         f"{report['images']} images, {report['labels']} labels, model {report['model']}, "
         f"seed {report['seed']}; {report['near_duplicate_queries']} near-duplicate queries, "
         f"{report['category_queries']} category queries; {report['seconds']} s"),
        "",
        (f"| configuration | ND recall@1 | ND mAP | category P@10 | vs {BASELINE} | chance P@10 | index ms/img "
         "| query ms/img | note |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def cell(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in report["results"]:
        versus = (f"{100 * (r['category_p_at_10'] / base['category_p_at_10'] - 1):+.1f}%"
                  if base and base["category_p_at_10"] and r["category_p_at_10"] is not None else "")
        lines.append(f"| {r['config']} | {cell(r['nd_recall_at_1'], 3)} | {cell(r['nd_map'], 3)} | "
                     f"{cell(r['category_p_at_10'], 3)} | {versus} | {cell(r['chance_p_at_10'], 3)} | "
                     f"{cell(r['index_ms_per_image'], 1)} | {cell(r['query_ms_per_image'], 1)} | {r['note']} |")
    kinds = list(report["queries_per_alteration"])
    if not kinds:
        return "\n".join(lines)
    kinds = [k for k in ALL_ALTERATIONS if k in kinds] + [k for k in kinds if k not in ALL_ALTERATIONS]
    counts = report["queries_per_alteration"]
    for title, subset in (("everyday", [k for k in kinds if k not in HARD_ALTERATIONS]),
                          ("hard", [k for k in kinds if k in HARD_ALTERATIONS])):
        if not subset:
            continue
        families = list(dict.fromkeys(family(k) for k in subset)) if title == "hard" else []
        lines += ["", f"Near-duplicate recall@1 per {title} alteration (queries: "
                  + ", ".join(f"{k} {counts[k]}" for k in subset) + ")", "",
                  "| configuration | " + " | ".join(families + subset) + " |",
                  "|---|" + "---|" * (len(families) + len(subset))]
        for r in report["results"]:
            per = r["per_alteration_recall_at_1"]
            fam = [family_recall(per, counts, f) for f in families]
            lines.append(f"| {r['config']} | " + " | ".join(
                [f"**{cell(v, 3)}**" for v in fam] + [cell(per.get(k), 2) for k in subset]) + " |")
    return "\n".join(lines)


def family_recall(per_kind: dict[str, float | None], counts: dict[str, int], name: str) -> float | None:
    """Recall@1 over all the queries of one family (kinds weighted by their query counts)."""
    kinds = [k for k in per_kind if family(k) == name and per_kind[k] is not None]
    total = sum(counts[k] for k in kinds)
    return sum(per_kind[k] * counts[k] for k in kinds) / total if total else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("folder", type=Path, help="folder whose sub-folders are labels")
    parser.add_argument("--index", type=Path, help="index for the imgsim configuration: evaluated if it exists, "
                                                   "else created there and kept (default: a temporary one)")
    parser.add_argument("--model", default=BUNDLED_MODEL, help=f"catalogue model (default {BUNDLED_MODEL})")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated configuration names (default: all the standard ones)")
    parser.add_argument("--per-image", default="2",
                        help="alterations per image, or 'all' (default 2; 0 measures categories only)")
    parser.add_argument("--alterations", help="comma-separated alteration kinds to draw from (default all: "
                                              + ", ".join(ALTERATIONS) + ")")
    parser.add_argument("--hard", default="",
                        help="hard alterations made of every image besides the everyday ones: 'all', or "
                             "comma-separated kinds or families (" + ", ".join(HARD_ALTERATIONS) + ")")
    parser.add_argument("--width", default="full",
                        help="picture sizes to evaluate at, comma-separated: 'full' (the files as they are) "
                             "and/or widths in pixels that the originals are first shrunk to, e.g. full,300")
    parser.add_argument("--per-class", type=int, help="at most this many images per label (seeded sample)")
    parser.add_argument("--limit", type=int, help="at most this many images in all (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whiten-min", type=int, default=200,
                        help="whiten only collections of at least this many images (default 200)")
    parser.add_argument("--learn-from", type=Path, metavar="FOLDER",
                        help="learn centring and whitening from FOLDER's images instead of the collection's")
    parser.add_argument("--work", type=Path, help="keep the altered query files in this folder")
    parser.add_argument("--misses", metavar="CONFIG", help="also list the failed near-duplicate queries of CONFIG")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in configs:
        try:
            if not product_config(name):
                Config.parse(name)
        except ValueError as e:
            parser.error(str(e))
    kinds = [k.strip() for k in args.alterations.split(",")] if args.alterations else None
    if kinds and (unknown := set(kinds) - set(ALTERATIONS)):
        parser.error(f"unknown alterations: {', '.join(sorted(unknown))}")
    try:
        per_image = None if args.per_image == "all" else int(args.per_image)
    except ValueError:
        per_image = -1
    if per_image is not None and per_image < 0:
        parser.error("--per-image must be a number (0: category precision only) or 'all'")
    hard: list[str] = []
    for name in (n.strip() for n in args.hard.split(",") if n.strip()):
        matched = [k for k in HARD_ALTERATIONS if name in ("all", k, family(k))]
        if not matched:
            parser.error(f"unknown hard alteration {name!r}")
        hard += [k for k in matched if k not in hard]
    try:
        widths = [None if w.strip() == "full" else int(w) for w in args.width.split(",")]
    except ValueError:
        parser.error("--width takes 'full' and/or numbers of pixels, e.g. full,300")
    if args.index and len(widths) > 1:
        parser.error("--index works with one --width")
    reports = []
    for width in widths:
        work = args.work / (f"w{width}" if width else "full") if args.work and len(widths) > 1 else args.work
        reports.append(run(args.folder, configs=configs, model=args.model, index_path=args.index,
                           per_image=per_image, per_class=args.per_class, limit=args.limit, seed=args.seed,
                           whiten_min=args.whiten_min, work=work, kinds=kinds, hard=hard, width=width,
                           learn_from=args.learn_from))
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
        return 0
    for report in reports:
        print(format_report(report) + "\n")
        if args.misses:
            for r in report["results"]:
                if r["config"] == args.misses:
                    print(f"Misses of {r['config']}:")
                    for m in r["misses"]:
                        print(f"  {m['kind']:12s} {m['original']} ({m['detail']}) -> {m['top1']}, "
                              f"original at rank {m['rank_of_original']}")
                    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
