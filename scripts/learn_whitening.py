"""Learn a whitening of a model's descriptors from altered copies of pictures, and write it into the model.

    apt-get install -y openclipart-png            # the pictures it learns from (public domain clip-art)
    python scripts/learn_whitening.py -o models/efficientnet-lite0-lw.onnx
    python scripts/learn_whitening.py --base efficientnet-lite0-int8 --head-from models/efficientnet-lite0-lw.onnx \\
        -o models/efficientnet-lite0-lw.int8.onnx      # the same head on the INT8 backbone

Learned whitening (Radenovic, Tolias and Chum, "Fine-tuning CNN image retrieval with no human
annotation", 2018, section 3.3), learned without labels: every training picture is altered in
seeded random ways (blurred, cropped to its centre and often made grey, turned with black corners,
two of these at once, or an everyday edit from scripts/eval_retrieval.py), and the directions in
which a picture and its altered copies differ are shrunk. With x the base model's descriptor (GeM,
p = 3, of the last feature map, L2-normalised), mu the mean of the training descriptors and

    C = mean over (picture, altered copy) pairs of (x_copy - x_picture)(x_copy - x_picture)',
        eigenvalues l, eigenvectors U,

the new descriptor is ``(x - mu) U diag(l + shrinkage * mean(l))^(-1/2) U'`` (normalised by
imgsim). No dimension is dropped. The graph written is the base model with that head on its
``feature_map`` output: GeM, L2-normalisation, minus mu, times the matrix (stored as float16 and
cast, to halve its size); its ``embedding`` output is the new descriptor, its ``feature_map`` output
stays. `--check` compares the written graph with the same computation in numpy.

The pictures: ``--pictures`` of the PNGs under ``--clipart`` (Debian's ``openclipart-png``, public
domain), a seeded sample, decoded as imgsim decodes (transparency flattened), every other one made
at most 300 pixels wide (as web pictures are) and the rest at most 640; each is altered ``--copies`` times.
Strengths are drawn from ranges, not the evaluation's fixed settings (blur radius 0.3-2 % of the
width, centre 45-80 % of each side, 5-25 degrees; the everyday edits are the harness's own functions).
None of these pictures is in the evaluation data (scikit-image's photos and Tux Paint's stamps).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval_retrieval as er  # noqa: E402  (its everyday alterations and centre crop)

from imgsim import images as imgs  # noqa: E402
from imgsim.errors import ImageError, ImgsimError  # noqa: E402
from imgsim.models import Model, gem, normalize  # noqa: E402

CLIPART = Path("/usr/share/openclipart")
GEM_P = 3.0
SHRINKAGE = 1.0
TOLERANCE = 1e-4


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _hard(name: str, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.003, 0.02) * img.width))
    if name == "greycrop":
        crop = er._centre_crop(rng.uniform(0.45, 0.8), img)
        return ImageOps.grayscale(crop).convert("RGB") if rng.random() < 0.7 else crop
    return img.rotate(rng.uniform(5, 25) * rng.choice([-1, 1]), Image.Resampling.BICUBIC, expand=True,
                      fillcolor=(0, 0, 0))


def alter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One altered copy: a hard alteration at a random strength, two of them, or an everyday edit; then JPEG."""
    kind = rng.choice(["blur", "greycrop", "rot", "everyday", "two"], p=[.2, .2, .15, .3, .15])
    if kind == "everyday":
        altered = er.ALTERATIONS[str(rng.choice(sorted(er.ALTERATIONS)))](img, rng)
        # an EXIF-rotated copy is the same picture once decoded
        return jpeg(img if altered.exif_orientation else altered.image, altered.quality)
    if kind == "two":
        for name in rng.choice(["blur", "greycrop", "rot"], 2, replace=False):
            img = _hard(str(name), img, rng)
        return jpeg(img, int(rng.integers(40, 81)))
    return jpeg(_hard(str(kind), img, rng), int(rng.integers(60, 95)))


def pictures(root: Path, count: int, rng: np.random.Generator) -> Iterator[Image.Image]:
    """`count` pictures from a seeded order of the PNGs under `root`, decoded one at a time."""
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder (the default is Debian's openclipart-png: "
                         f"apt-get install -y openclipart-png)")
    files = sorted(root.rglob("*.png"))
    if len(files) < count:
        raise SystemExit(f"{root}: {len(files)} PNG files, need {count}")
    made = 0
    for path in (files[i] for i in rng.permutation(len(files))):
        if made == count:
            return
        try:
            img = imgs.decode(path).image
        except ImageError:
            continue
        if min(img.size) < 64:
            continue
        img = er.at_most_wide(img, 300 if made % 2 == 0 else 640)
        made += 1
        yield img
    if made < count:
        raise SystemExit(f"{root}: only {made} of its PNG files could be used (decodable, at least 64 pixels), "
                         f"need {count}")


def descriptors(model: Model, images: list[Image.Image], batch: int = 32) -> np.ndarray:
    """The base descriptor x of each image: GeM (p = 3) of the feature map, L2-normalised (`model` is
    loaded with that pooling)."""
    return np.concatenate([model.embed(np.stack([imgs.to_array(img, model.preprocess)
                                                 for img in images[start:start + batch]]))
                           for start in range(0, len(images), batch)])


CHUNK = 96
"""Pictures embedded per step (a multiple of the batch of 32, so that every batch, and the bytes of the
file written, are what embedding all pictures and then all copies in batches of 32 gives)."""


def learn_from(model: Model, images: Iterator[Image.Image], copies: int, rng: np.random.Generator,
               shrinkage: float) -> tuple[np.ndarray, np.ndarray, list[Image.Image]]:
    """(mu, W, the first 16 pictures): each picture and its `copies` altered copies embedded a chunk at
    a time, so that only descriptors are kept (3,000 pictures held at once took 6 GB)."""
    originals, altered, pair, first = [], [], [], []
    while chunk := list(itertools.islice(images, CHUNK)):
        first.extend(chunk[:16 - len(first)])
        done = len(pair) // copies  # pictures embedded so far
        copies_of = [alter(img, rng) for img in chunk for _ in range(copies)]
        pair.extend(done + i // copies for i in range(len(copies_of)))
        originals.append(descriptors(model, chunk))
        altered.append(descriptors(model, copies_of))
    x, xa = np.concatenate(originals), np.concatenate(altered)
    print(f"{len(x)} pictures, {len(xa)} altered copies; embedded with {model.name}", file=sys.stderr)
    return (*learn(x, xa, np.array(pair), shrinkage), first)


def learn(originals: np.ndarray, copies: np.ndarray, pair: np.ndarray,
          shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(mu, W): the descriptor becomes (x - mu) @ W."""
    mu = np.concatenate([originals, copies]).mean(axis=0)
    diff = (copies - originals[pair]).astype(np.float64)
    eig, u = np.linalg.eigh(diff.T @ diff / len(diff))
    eig = np.maximum(eig, 0.0)
    w = (u * (eig + shrinkage * eig.mean()) ** -0.5) @ u.T
    w = w / np.abs(w).max()
    if not (np.isfinite(w).all() and np.isfinite(mu).all()):
        raise SystemExit("the learned whitening is not finite: too few or too alike pictures")
    return mu.astype(np.float32), w.astype(np.float32)


def refuse_base(base: onnx.ModelProto) -> None:
    """A base model the head cannot go on: one line, before any work."""
    if any(t.name == "lw_matrix_f16" for t in base.graph.initializer):
        raise SystemExit("the base model has a learned-whitening head already: give the model without it")
    if {"feature_map", "embedding"} - {o.name for o in base.graph.output}:
        raise SystemExit("the base model needs the outputs feature_map and embedding")


def with_head(base: onnx.ModelProto, mu: np.ndarray, w: np.ndarray) -> onnx.ModelProto:
    """`base` with its ``embedding`` output replaced by the whitened GeM descriptor (not normalised)."""
    refuse_base(base)
    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    old = producer["embedding"]  # the average pooling's Flatten, and the pooling if nothing else reads it
    graph.node.remove(old)
    for name in old.input:
        if name in producer and name != "feature_map" and not any(name in n.input for n in graph.node):
            graph.node.remove(producer[name])
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1e-6, np.float32), "lw_eps"),
        numpy_helper.from_array(np.array(GEM_P, np.float32), "lw_p"),
        numpy_helper.from_array(np.array(1.0 / GEM_P, np.float32), "lw_inv_p"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "lw_tiny"),
        numpy_helper.from_array(mu.astype(np.float32), "lw_mean"),
        numpy_helper.from_array(w.astype(np.float16), "lw_matrix_f16"),
    ])
    graph.node.extend([
        helper.make_node("Max", ["feature_map", "lw_eps"], ["lw_clipped"], name="lw_clip"),
        helper.make_node("Pow", ["lw_clipped", "lw_p"], ["lw_cubed"], name="lw_pow"),
        helper.make_node("ReduceMean", ["lw_cubed"], ["lw_mean_p"], axes=[2, 3], keepdims=0, name="lw_pool"),
        helper.make_node("Pow", ["lw_mean_p", "lw_inv_p"], ["lw_gem"], name="lw_root"),
        helper.make_node("ReduceL2", ["lw_gem"], ["lw_norm"], axes=[1], keepdims=1, name="lw_l2"),
        helper.make_node("Max", ["lw_norm", "lw_tiny"], ["lw_norm_safe"], name="lw_norm_clip"),
        helper.make_node("Div", ["lw_gem", "lw_norm_safe"], ["lw_unit"], name="lw_normalise"),
        helper.make_node("Sub", ["lw_unit", "lw_mean"], ["lw_centred"], name="lw_centre"),
        helper.make_node("Cast", ["lw_matrix_f16"], ["lw_matrix"], to=TensorProto.FLOAT, name="lw_matrix_cast"),
        helper.make_node("MatMul", ["lw_centred", "lw_matrix"], ["embedding"], name="lw_whiten"),
    ])
    for out in graph.output:
        if out.name == "embedding":
            out.CopyFrom(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", int(w.shape[1])]))
    model.producer_name = "imgsim scripts/learn_whitening.py"
    onnx.checker.check_model(model)
    return model


def refuse_unwritable(output: Path, base: Path) -> None:
    """Before any work: `output` must not be a folder or the base model's own file, and its folder must
    exist (or be creatable) and take a new file."""
    if output.is_dir():
        raise SystemExit(f"{output}: is a folder; name the file to write")
    if output.exists() and output.resolve() == base.resolve():
        raise SystemExit(f"{output}: is the base model's own file; write the new model elsewhere")
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{output.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"{output}: cannot write there ({e.strerror or e})") from None


def head_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, W) of a model this script wrote."""
    try:
        weights = {t.name: t for t in onnx.load(str(path)).graph.initializer}
        return (numpy_helper.to_array(weights["lw_mean"]).astype(np.float32),
                numpy_helper.to_array(weights["lw_matrix_f16"]).astype(np.float32))
    except Exception as e:  # unreadable, not ONNX, or no such head
        raise SystemExit(f"{path}: not a model with a learned-whitening head ({type(e).__name__}: {e})") from None


def check(path: Path, mu: np.ndarray, w: np.ndarray, images: list[Image.Image], prep) -> float:
    """Largest difference between the written graph's normalised embedding and numpy's."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = np.stack([imgs.to_array(img, prep) for img in images])
    fmap, emb = session.run(["feature_map", "embedding"], {"input": arrays})
    expected = normalize((normalize(gem(fmap, GEM_P)) - mu) @ w.astype(np.float16).astype(np.float32))
    return float(np.abs(normalize(emb) - expected).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("-o", "--output", type=Path, required=True, help="the ONNX file to write")
    parser.add_argument("--base", default="efficientnet-lite0", help="catalogue model the head is added to")
    parser.add_argument("--learn-from-model", help="catalogue model whose descriptors the whitening is learned "
                                                   "from (default: --base)")
    parser.add_argument("--head-from", type=Path, metavar="ONNX",
                        help="copy the head of a model this script wrote instead of learning one (e.g. the fp32 "
                             "model's, onto its INT8 copy)")
    parser.add_argument("--clipart", type=Path, default=CLIPART, help=f"folder of PNG pictures (default {CLIPART})")
    parser.add_argument("--pictures", type=int, default=3000, help="pictures to learn from (default 3000)")
    parser.add_argument("--copies", type=int, default=3, help="altered copies of each (default 3)")
    parser.add_argument("--shrinkage", type=float, default=SHRINKAGE,
                        help=f"added to every eigenvalue, times their mean (default {SHRINKAGE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare the written graph with numpy")
    args = parser.parse_args(argv)
    if args.pictures < 2 or args.copies < 1:
        parser.error("--pictures must be at least 2 and --copies at least 1")
    if not args.shrinkage > 0:
        parser.error("--shrinkage must be above 0 (without it, directions the copies never vary in blow up)")
    if args.head_from and args.learn_from_model:
        parser.error("--learn-from-model learns a head; --head-from copies one: give one of them")

    rng = np.random.default_rng(args.seed)
    try:
        base = Model.load(args.base)
        learner = None if args.head_from else Model.load(args.learn_from_model or args.base, pooling=f"gem{GEM_P:g}")
    except ImgsimError as e:
        raise SystemExit(f"error: {e}") from None
    base_graph = onnx.load(str(base.path))
    refuse_base(base_graph)
    refuse_unwritable(args.output, base.path)
    if args.head_from:
        mu, w = head_of(args.head_from)
        if mu.shape != (base.dim,) or w.shape != (base.dim, base.dim):
            raise SystemExit(f"{args.head_from}: its head is {len(mu)}-d, {base.name} gives {base.dim}-d descriptors")
        images = list(pictures(args.clipart, 16, rng)) if args.check else []
    else:
        mu, w, images = learn_from(learner, pictures(args.clipart, args.pictures, rng), args.copies, rng,
                                   args.shrinkage)
    model = with_head(base_graph, mu, w)
    try:
        onnx.save(model, str(args.output))
    except OSError as e:
        raise SystemExit(f"{args.output}: could not be written ({e.strerror or e})") from None
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    if args.check:
        error = check(args.output, mu, w, images[:16], base.preprocess)
        print(f"check: largest difference from numpy {error:.2e} (tolerance {TOLERANCE:g})")
        if not error <= TOLERANCE:  # NaN fails too
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
