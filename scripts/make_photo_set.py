"""Build the calibration and evaluation pictures used by scripts/quantize.py, from local packages.

    python scripts/make_photo_set.py OUT [--stamps /usr/share/tuxpaint/stamps]

Writes ``OUT/calibration/`` and ``OUT/evaluation/`` (PNG files, disjoint), from two sources that
need no network:

* scikit-image's sample photos (``skimage.data``; the ones shipped in the wheel), each as the
  whole picture, its mirror image, and random crops (30-80 % of the area, some mirrored), with
  the shorter side scaled to 288 pixels. Every 4th variant of each photo goes to calibration.
* Tux Paint's clip-art stamps (Debian ``tuxpaint-stamps-default``: ``apt-get install -y
  tuxpaint-stamps-default``), every ``--stamp-step``-th PNG in sorted order, skipping the
  ``*_mirror.png`` copies; every 4th of those goes to calibration. Copied byte for byte.

The output depends only on the seed, scikit-image's files, the stamps package and Pillow's
resampling, so the same versions give the same pictures.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ["astronaut", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "brick",
          "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
          "rocket", "text", "stereo_motorcycle"]
SHORTER_SIDE, CROPS, CALIBRATION_EVERY = 288, 10, 4
DEFAULT_STAMPS = Path("/usr/share/tuxpaint/stamps")


def photos() -> dict[str, Image.Image]:
    """The scikit-image photos that load offline, as RGB; the stereo pair gives two."""
    from skimage import data

    found = {}
    for name in PHOTOS:
        try:
            array = getattr(data, name)()
        except Exception:  # fetched on demand in some scikit-image versions: not available offline
            continue
        arrays = {f"{name}_left": array[0], f"{name}_right": array[1]} if isinstance(array, tuple) else {name: array}
        for key, a in arrays.items():
            found[key] = Image.fromarray(np.asarray(a, np.uint8)).convert("RGB")
    return found


def _scaled(img: Image.Image) -> Image.Image:
    scale = SHORTER_SIDE / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.BILINEAR)


def variants(img: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """The whole picture, its mirror image, and ``CROPS`` random crops, every one scaled."""
    out = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    w, h = img.size
    for i in range(CROPS):
        area = rng.uniform(0.3, 0.8) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch))
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else crop)
    return [_scaled(v) for v in out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS, help=f"default: {DEFAULT_STAMPS}")
    ap.add_argument("--stamp-step", type=int, default=2, help="take every N-th stamp (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    calibration, evaluation = args.out / "calibration", args.out / "evaluation"
    for folder in (calibration, evaluation):
        if folder.exists() and any(folder.iterdir()):
            print(f"error: {folder} is not empty", file=sys.stderr)
            return 1
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    counts = {"calibration": 0, "evaluation": 0}

    def place(i: int) -> Path:
        folder = calibration if i % CALIBRATION_EVERY == 0 else evaluation
        counts[folder.name] += 1
        return folder

    found = photos()
    for name, img in found.items():
        for i, variant in enumerate(variants(img, rng)):
            variant.save(place(i) / f"photo-{name}-{i:02d}.png")
    stamps = []
    if args.stamps.is_dir():
        stamps = sorted(p for p in args.stamps.rglob("*.png") if not p.stem.endswith("_mirror"))
        stamps = stamps[::args.stamp_step]
        for i, path in enumerate(stamps):
            name = "-".join(path.relative_to(args.stamps).with_suffix("").parts)
            shutil.copyfile(path, place(i) / f"stamp-{name}.png")
    else:
        print(f"no stamps at {args.stamps}: photos only", file=sys.stderr)
    print(f"{len(found)} photos x {CROPS + 2} variants, {len(stamps)} stamps: "
          f"{counts['calibration']} in {calibration}, {counts['evaluation']} in {evaluation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
