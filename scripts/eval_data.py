"""Build a labelled folder for `scripts/eval_retrieval.py` from pictures already on this machine.

    python scripts/eval_data.py eval-data            # skimage photos + Tux Paint stamps if installed
    python scripts/eval_retrieval.py eval-data

Each immediate sub-folder of OUT is a label:

* ``photo-NAME/NAME.jpg``: the real photos that ship with scikit-image (JPEG, quality 95, as a
  camera or phone would store them). Each is its own label: they count for near-duplicate recall
  and are distractors for the category queries, but are never category queries themselves.
* ``CATEGORY/NAME.png``: the clip-art stamps of Debian's ``tuxpaint-stamps-default``
  (``/usr/share/tuxpaint/stamps``), when installed. The label is the first two folder levels below
  ``stamps/`` (``animals/birds`` -> ``animals-birds``), ``cartoon`` sub-folders folded into their
  parent; a label with fewer than `min_class` stamps is folded into its top-level category, and
  one still that small is dropped. ``symbols/alphabets`` is left out: it is the same glyphs drawn
  again for several alphabets, so visually identical pictures would sit in different files and
  "find your own original" would have no single answer. For the same reason ``X_mirror.png``,
  Tux Paint's own drawing of ``X.png`` facing the other way, is left out where ``X.png`` exists.
  Stamps whose shorter side is under `min_side` pixels (icons of 7 to 60 pixels) are left out, and
  of the rest at most `per_class` per label are kept (a seeded sample).

Stamps are RGBA clip-art meant to be drawn onto a white canvas. They are composited onto white
(with imgsim's own `to_rgb`, so the file holds exactly what imgsim would have indexed from the
transparent original) and written as RGB PNG: the alterations of the harness (JPEG re-encoding,
greyscale, pasting onto a coloured background, ...) need pixels without an alpha channel, and a
white page is how such pictures are seen in documents and catalogues. Stamps that are
pixel-identical after compositing are written once.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from imgsim.images import to_rgb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_photos import photo  # noqa: E402  (one loader for every script that uses skimage's photos)

STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
EXCLUDED_STAMP_FOLDERS = ("symbols/alphabets",)

# The photographs in skimage.data (`cat` is the same picture as `chelsea`; `stereo_motorcycle`'s
# right view is a near-duplicate of its left one, so only the left is used).
PHOTO_NAMES = ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
               "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon",
               "motorcycle_left", "page", "retina", "rocket", "text"]


def photos() -> dict[str, Image.Image]:
    return {name: img for name in PHOTO_NAMES if (img := photo(name)) is not None}


def stamp_label(relative: Path) -> tuple[str, str]:
    """(two-level label, top-level label) of a stamp from its path below stamps/."""
    parts = [p for p in relative.parent.parts if p != "cartoon"]
    return "-".join(parts[:2]), parts[0]


def stamps(root: Path = STAMPS_ROOT, *, min_side: int = 64, min_class: int = 6, per_class: int = 30,
           seed: int = 0) -> dict[str, list[tuple[str, Image.Image]]]:
    """label -> [(file stem, RGB image on white)], sorted; empty when the stamps are not installed."""
    if not root.is_dir():
        return {}
    fine: dict[str, list[tuple[Path, Image.Image]]] = defaultdict(list)
    seen: set[bytes] = set()
    for path in sorted(root.rglob("*.png")):
        relative = path.relative_to(root)
        if any(relative.as_posix().startswith(prefix + "/") for prefix in EXCLUDED_STAMP_FOLDERS):
            continue
        if path.stem.endswith("_mirror") and path.with_name(path.stem[:-7] + ".png").exists():
            continue  # Tux Paint's drawing of the same thing facing the other way
        with Image.open(path) as img:
            if min(img.size) < min_side:
                continue
            img.load()
            rgb = to_rgb(img)
        digest = hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        fine[stamp_label(relative)[0]].append((relative, rgb))

    labels: dict[str, list[tuple[Path, Image.Image]]] = defaultdict(list)
    for label, entries in fine.items():
        target = label if len(entries) >= min_class else stamp_label(entries[0][0])[1]
        labels[target].extend(entries)

    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, Image.Image]]] = {}
    for label in sorted(labels):
        entries = sorted(labels[label], key=lambda e: e[0].as_posix())
        if len(entries) < min_class:
            continue
        if len(entries) > per_class:
            keep = sorted(rng.choice(len(entries), per_class, replace=False).tolist())
            entries = [entries[i] for i in keep]
        out[label] = [("_".join(rel.with_suffix("").parts[1:]) or rel.stem, rgb) for rel, rgb in entries]
    return out


def build(out: Path, *, with_photos: bool = True, with_stamps: bool = True, stamps_root: Path = STAMPS_ROOT,
          min_side: int = 64, min_class: int = 6, per_class: int = 30, seed: int = 0) -> dict[str, int]:
    """Write the folder; return label -> number of files written."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    if with_photos:
        for name, img in photos().items():
            folder = out / f"photo-{name}"
            folder.mkdir(exist_ok=True)
            img.save(folder / f"{name}.jpg", quality=95)
            counts[folder.name] = 1
    if with_stamps:
        for label, entries in stamps(stamps_root, min_side=min_side, min_class=min_class,
                                     per_class=per_class, seed=seed).items():
            folder = out / label
            folder.mkdir(exist_ok=True)
            for stem, img in entries:
                img.save(folder / f"{stem}.png", optimize=False)
            counts[label] = len(entries)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created; existing files are overwritten)")
    parser.add_argument("--no-photos", action="store_true", help="leave out the skimage photos")
    parser.add_argument("--no-stamps", action="store_true", help="leave out the Tux Paint stamps")
    parser.add_argument("--stamps-root", type=Path, default=STAMPS_ROOT)
    parser.add_argument("--min-side", type=int, default=64, help="smallest stamp side kept (default 64)")
    parser.add_argument("--min-class", type=int, default=6, help="smallest label kept (default 6)")
    parser.add_argument("--per-class", type=int, default=30, help="most stamps per label (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = build(args.out, with_photos=not args.no_photos, with_stamps=not args.no_stamps,
                   stamps_root=args.stamps_root, min_side=args.min_side, min_class=args.min_class,
                   per_class=args.per_class, seed=args.seed)
    n_photos = sum(v for k, v in counts.items() if k.startswith("photo-"))
    n_stamps = sum(v for k, v in counts.items() if not k.startswith("photo-"))
    if not args.no_stamps and n_stamps == 0:
        print(f"no stamps: {args.stamps_root} not found (apt-get install tuxpaint-stamps-default)", file=sys.stderr)
    print(f"{args.out}: {n_photos} photos, {n_stamps} stamps in {len(counts) - n_photos} labels", file=sys.stderr)
    for label, n in sorted(counts.items()):
        if not label.startswith("photo-"):
            print(f"  {label}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
