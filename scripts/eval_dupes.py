"""Measure `imgsim dupes` on real pictures: which threshold joins copies and keeps different pictures apart.

    python scripts/eval_data.py /tmp/evdata          # skimage photos + Tux Paint clip-art in categories
    python scripts/eval_dupes.py /tmp/evdata         # prints the table; --json for the numbers

Every original gets altered copies of the kinds people make (resized, re-encoded at low quality,
cropped, mirrored, brightened or darkened, captioned); all of it is indexed through `Index` with
the product's model and pipeline. A pair of images is a true duplicate pair when both come from one
original. For each threshold the script reports, over all pairs, precision and recall of "score >=
threshold", how many different pictures of the same category (two different apples) would be
joined, and then runs the real grouping (`Index.duplicates`, transitive) at the default threshold and
reports precision and recall of the pairs its groups imply. It also prints what scores mean in
practice: the score distribution of each kind of pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_retrieval import Altered, caption, load_dataset, save_jpeg  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from imgsim import Index  # noqa: E402
from imgsim import images as imgs  # noqa: E402
from imgsim.models import BUNDLED_MODEL  # noqa: E402


def _resized(img, rng):
    scale = float(rng.uniform(0.35, 0.7))
    size = (max(32, round(img.width * scale)), max(32, round(img.height * scale)))
    return Altered(img.resize(size, Image.Resampling.LANCZOS), f"x{scale:.2f}", 85)


def _reencoded(img, rng):
    return Altered(img, "", int(rng.integers(40, 76)))


def _cropped(img, rng):
    f = float(rng.uniform(0.75, 0.92))
    cw, ch = round(img.width * f), round(img.height * f)
    left, top = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
    return Altered(img.crop((left, top, left + cw, top + ch)), f"{f:.2f}")


def _edited(img, rng):
    out = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.25)))
    return Altered(ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.85, 1.2))), "")


COPIES = {"resized": _resized, "re-encoded": _reencoded, "cropped": _cropped,
          "mirrored": lambda img, rng: Altered(ImageOps.mirror(img), ""), "edited": _edited, "captioned": caption}
"""What people do to a photo before it comes back as a duplicate: resized (35-70%), re-encoded (JPEG
quality 40-75), cropped (75-92% of each side), mirrored, lightly edited (brightness and contrast within
about 20%), captioned (a text band). scripts/eval_retrieval.py has the harder stress tests."""
COPY_KINDS = tuple(COPIES)
THRESHOLDS = [round(t, 2) for t in np.arange(0.60, 0.99, 0.02)]


def build(folder: Path, out: Path, *, seed: int, limit: int | None,
          photos: Path | None = None) -> dict[str, tuple[int, str | None, str]]:
    """Originals and their copies under `out`; returns stored path -> (source, label, kind)."""
    items = load_dataset(folder, limit=limit, seed=seed)
    if photos is not None:  # more real photos, each its own category (wallpapers, a holiday folder...)
        extra = load_dataset(photos, seed=seed)
        offset = 1 + max((item.group for item in items), default=0)
        items += [replace(item, label=f"photo-{item.key}", group=item.group + offset) for item in extra]
    truth: dict[str, tuple[int, str | None, str]] = {}
    for i, item in enumerate(items):
        original = imgs.decode(item.path).image
        target = out / f"{i:05d}-original{item.path.suffix.lower()}"
        target.write_bytes(item.path.read_bytes())
        truth[target.name] = (item.group, item.label, "original")
        for kind in COPY_KINDS:
            rng = np.random.default_rng([seed, i, COPY_KINDS.index(kind)])
            path = out / f"{i:05d}-{kind}.jpg"
            save_jpeg(COPIES[kind](original, rng), path)
            truth[path.name] = (item.group, item.label, kind)
    return truth


def evaluate(folder: Path, *, model: str, seed: int = 0, limit: int | None = None, photos: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        truth = build(folder, images, seed=seed, limit=limit, photos=photos)
        with Index.create(Path(tmp) / "idx", model=model) as index:
            index.add(images)
        with Index.open(Path(tmp) / "idx", read_only=True) as index:
            rows = sorted(index.rows(), key=lambda r: r.id)
            ids = np.asarray([r.id for r in rows])
            found, vectors = index.graph.vectors(ids)
            assert len(found) == len(ids)
            scores = np.stack([index.graph.score_against(v, vectors) for v in vectors])
            source = np.asarray([truth[r.path][0] for r in rows])
            label = np.asarray([truth[r.path][1] or "" for r in rows])
            kind = [truth[r.path][2] for r in rows]
            upper = np.triu(np.ones_like(scores, dtype=bool), k=1)
            same = (source[:, None] == source[None, :]) & upper
            other = (~(source[:, None] == source[None, :])) & upper
            same_label = other & (label[:, None] == label[None, :]) & (label[:, None] != "")
            photo = np.char.startswith(label.astype(str), "photo")  # eval_data.py's photo-NAME folders; --photos
            sets = {"all": np.ones_like(same), "photos": photo[:, None] & photo[None, :],
                    "clip-art": ~photo[:, None] & ~photo[None, :]}
            sweep = []
            for t in THRESHOLDS:
                hit = scores >= t
                entry = {"threshold": t, "same_category_joined": int((hit & same_label).sum())}
                for name, mask in sets.items():
                    tp, fp = int((hit & same & mask).sum()), int((hit & other & mask).sum())
                    entry[name] = {"precision": tp / max(1, tp + fp), "recall": tp / max(1, (same & mask).sum()),
                                   "false_pairs": fp}
                sweep.append(entry)
            groups, threshold = index.duplicates(), index.dupes_threshold
            position = {int(i): n for n, i in enumerate(ids)}
            group_of = np.full(len(ids), -1)
            for number, group in enumerate(groups):
                group_of[[position[m["id"]] for m in group.members]] = number
            in_group = (group_of[:, None] == group_of[None, :]) & (group_of[:, None] >= 0) & upper
            tp, fp = int((in_group & same).sum()), int((in_group & other).sum())
            originals = [n for n, k in enumerate(kind) if k == "original"]
            original_of = {int(source[o]): o for o in originals}
            per_kind = {}
            for copy_kind in COPY_KINDS:
                copies = [n for n, k in enumerate(kind) if k == copy_kind]
                joined = sum(1 for n in copies if group_of[n] >= 0 and group_of[n] == group_of[original_of[source[n]]])
                per_kind[copy_kind] = joined / max(1, len(copies))
            meaning = {}
            copy_pairs = {k: [] for k in COPY_KINDS}
            for n, k in enumerate(kind):
                if k != "original":
                    copy_pairs[k].append(scores[n, original_of[int(source[n])]])
            for k, values in copy_pairs.items():
                meaning[f"copy: {k}"] = np.percentile(values, [5, 50, 95]).tolist() if values else None
            meaning["different picture, same category"] = np.percentile(scores[same_label], [5, 50, 95]).tolist() \
                if same_label.any() else None
            meaning["unrelated"] = np.percentile(scores[other & ~same_label], [5, 50, 95]).tolist()
            meaning["top different-picture pair"] = float(scores[other].max())
    return {"images": len(ids), "originals": len(originals), "true_pairs": int(same.sum()),
            "sweep": sweep, "default_threshold": threshold,
            "grouping": {"precision": tp / max(1, tp + fp), "recall": tp / max(1, same.sum()), "false_pairs": fp,
                         "groups": len(groups), "copies_joined_to_original": per_kind},
            "score_meaning": meaning}


def format_report(r: dict) -> str:
    lines = [f"{r['images']} images: {r['originals']} originals and their copies ({', '.join(COPY_KINDS)}), "
             f"{r['true_pairs']} true duplicate pairs", "",
             "threshold  all: precision recall false  photos: precision recall false  "
             "clip-art: precision recall false"]
    for s in r["sweep"]:
        cells = "  ".join(f"{s[k]['precision']:>9.3f} {s[k]['recall']:>6.3f} {s[k]['false_pairs']:>5}"
                          for k in ("all", "photos", "clip-art"))
        lines.append(f"{s['threshold']:>9.2f}  {cells}")
    g = r["grouping"]
    lines += ["", f"imgsim dupes at the default {r['default_threshold']}: {g['groups']} groups, pairs precision "
                  f"{g['precision']:.3f}, recall {g['recall']:.3f}, {g['false_pairs']} false pairs",
              "copies grouped with their original: " + ", ".join(f"{k} {v:.2f}"
                                                                  for k, v in g["copies_joined_to_original"].items()),
              "", "what scores mean (5th / 50th / 95th percentile):"]
    for k, v in r["score_meaning"].items():
        lines.append(f"  {k}: " + (" / ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.3f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder made by scripts/eval_data.py")
    parser.add_argument("--model", default=BUNDLED_MODEL)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="at most this many originals (a seeded sample)")
    parser.add_argument("--photos", type=Path, help="a folder of more real photos to add as originals "
                        "(each its own category), e.g. /usr/share/backgrounds from Debian's gnome-backgrounds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = evaluate(args.folder, model=args.model, seed=args.seed, limit=args.limit, photos=args.photos)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
