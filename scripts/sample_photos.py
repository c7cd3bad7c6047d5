"""Write real sample photos (from scikit-image's bundled data) to a folder, plus altered copies to query with.

    python scripts/sample_photos.py samples
    imgsim index samples/photos && imgsim search samples/queries/coffee-crop.jpg -k 3

`samples/photos/` gets the originals as JPEG; `samples/queries/` gets a cropped, a resized and a
heavily re-compressed copy of each, which imgsim should match to their originals.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from imgsim.images import to_rgb

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "retina", "immunohistochemistry",
          "hubble_deep_field", "moon", "page", "brick", "gravel", "grass", "motorcycle_left"]


def photo(name: str) -> Image.Image | None:
    """One skimage.data photo as an RGB image, or None where this scikit-image lacks it offline."""
    from skimage import data

    try:
        array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    except (AttributeError, ImportError, OSError, ValueError):  # missing here, or fetched on demand (offline)
        return None
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    return to_rgb(Image.fromarray(array))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    (out / "photos").mkdir(parents=True, exist_ok=True)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    written = 0
    for name in PHOTOS:
        img = photo(name)
        if img is None:
            continue
        img.save(out / "photos" / f"{name}.jpg", quality=92)
        w, h = img.size
        img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(out / "queries" / f"{name}-crop.jpg", quality=90)
        img.resize((w // 3, h // 3), Image.Resampling.LANCZOS).save(out / "queries" / f"{name}-small.jpg", quality=90)
        img.save(out / "queries" / f"{name}-q30.jpg", quality=30)
        written += 1
    print(f"wrote {written} photos to {out / 'photos'} and {3 * written} altered copies to {out / 'queries'}")


if __name__ == "__main__":
    main()
