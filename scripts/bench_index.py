"""Indexing, re-sync and search figures on a folder of real photos; prints them, asserts nothing.

    python scripts/bench_index.py [--images 1000] [--model efficientnet-lite0] [--batch-size 16]
    python scripts/bench_index.py --images 200 --size 4000x3000     # 12-megapixel camera JPEGs

Builds N distinct photo-like JPEGs (640x480 or --size, crops/flips/colour shifts of scikit-image's
photos; reused across runs from --cache), then measures, in one run on one machine:
  - the first `index` (images/s, end to end: discovery, hashing, decoding, embedding, storage),
  - a sync of the unchanged folder (seconds, and as a ratio of the first run),
  - search latency through `Index.search` with a vector (ANN + SQLite lookup) and with an image file,
  - the size of the index per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_photos import PHOTOS, photo  # noqa: E402

from imgsim import Index, models  # noqa: E402
from imgsim.crops import CROP_VIEWS, DEFAULT_CROP_VIEWS  # noqa: E402


def make_photos(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (640, 480)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    rng = random.Random(seed)
    sources = [img for name in PHOTOS if (img := photo(name)) is not None]
    paths = []
    for i in range(count):
        img = rng.choice(sources)
        w, h = img.size
        scale = rng.uniform(0.5, 0.95)
        cw, ch = int(w * scale), int(h * scale)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        variant = img.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            variant = ImageOps.mirror(variant)
        variant = ImageEnhance.Color(variant).enhance(rng.uniform(0.5, 1.5))
        path = folder / f"img{i:05d}.jpg"
        variant.save(path, quality=rng.randint(70, 95))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--size", default="640x480", help="pixel size of the generated JPEGs, WxH")
    parser.add_argument("--pooling", help="try another pooling than the catalogue's, e.g. gem3-rmac3")
    parser.add_argument("--index-views", help="try other index views: comma-separated (e.g. centre60), or none")
    parser.add_argument("--input-size", type=int, help="try another input size than the catalogue's")
    views = parser.add_mutually_exclusive_group()
    views.add_argument("--centre-view", action="store_true",
                       help="index with the crop views of `imgsim index --centre-view` (default: its default one)")
    views.add_argument("--no-centre-view", action="store_true",
                       help="index without crop views, as `imgsim index --no-centre-view` does")
    views.add_argument("--crop-views", help="index with these crop views (Python's `crop_views`): comma-separated, "
                                            "e.g. grey60 (the default before soft60)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imgsim-bench-photos")
    args = parser.parse_args()

    if args.pooling or args.index_views or args.input_size:  # a variant of the catalogue entry, for this run only
        spec = models.CATALOGUE[args.model]
        prep = dataclasses.replace(
            spec.preprocess, size=args.input_size or spec.preprocess.size,
            resize_to=args.input_size or spec.preprocess.resize_to,
            index_views=(spec.preprocess.index_views if not args.index_views
                         else () if args.index_views == "none" else tuple(args.index_views.split(","))))
        models.CATALOGUE[args.model] = dataclasses.replace(spec, preprocess=prep, pooling=args.pooling or spec.pooling)
    crop_views = CROP_VIEWS if args.centre_view else () if args.no_centre_view else \
        tuple(args.crop_views.split(",")) if args.crop_views else DEFAULT_CROP_VIEWS
    size = tuple(int(v) for v in args.size.lower().split("x"))
    folder = args.cache / (str(args.images) if size == (640, 480) else f"{args.images}-{size[0]}x{size[1]}")
    paths = make_photos(folder, args.images, size=size)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "bench"
        with Index.create(base, model=args.model, root=folder, index_views=models.CATALOGUE[args.model].preprocess.index_views,
                          crop_views=crop_views) as index:
            first = index.sync(folder, batch_size=args.batch_size)
        with Index.open(base) as index:
            again = index.sync(folder)
        with Index.open(base, read_only=True) as index:
            rng = np.random.default_rng(1)
            picks = rng.choice(len(paths), size=min(args.queries, len(paths)), replace=False)
            vectors = [index.embed(paths[i]) for i in picks[:20]]
            index.search(vectors[0], k=10)  # load the graph once, outside the timing
            vector_ms = []
            for i in range(args.queries):
                start = time.perf_counter()
                index.search(vectors[i % len(vectors)], k=10)
                vector_ms.append((time.perf_counter() - start) * 1000)
            file_ms = []
            for i in picks[:50]:
                start = time.perf_counter()
                index.search(paths[i], k=10)
                file_ms.append((time.perf_counter() - start) * 1000)
            info = index.info()

    spec = models.CATALOGUE[args.model]
    print(f"model {args.model} (input {spec.preprocess.size}, pooling {spec.pooling}, index views "
          f"{','.join(spec.preprocess.index_views) or 'none'}, crop views "
          f"{','.join(crop_views) or 'none'}), {args.images} photos of {size[0]}x{size[1]} JPEG, "
          f"batch {args.batch_size}")
    print(f"first index:     {first.seconds:7.2f} s  {first.images_per_second:6.1f} images/s  (added {first.added})")
    print(f"unchanged sync:  {again.seconds:7.2f} s  ({again.seconds / first.seconds:.4f} of the first run, "
          f"embedded {again.embedded})")
    print(f"search, vector:  median {statistics.median(vector_ms):.3f} ms, "
          f"p99 {np.percentile(vector_ms, 99):.3f} ms (k=10, HNSW + SQLite rows)")
    print(f"search, file:    median {statistics.median(file_ms):.1f} ms (decode + embed + search)")
    print(f"size per image:  {info['bytes_per_image']} bytes "
          f"(faiss {info['faiss_bytes'] / 1e6:.1f} MB, sqlite {info['sqlite_bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
