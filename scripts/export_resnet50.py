"""Export torchvision's ResNet50 to ONNX without torch, from a checkpoint or from random weights.

    python scripts/export_resnet50.py WEIGHTS -o models/resnet50.onnx [--check]
    python scripts/export_resnet50.py --random SEED -o resnet50.onnx [--check]

WEIGHTS is a torchvision ``resnet50-*.pth`` (e.g. IMAGENET1K_V2), or a ``.safetensors`` file
with the same tensor names (timm's ResNet50 checkpoints use them too). It is read by
``onnx_tools.load_state_dict``, which cannot run code from a pickle. ``--random SEED`` needs no
file: it makes the weights itself (He-initialised convolutions, BatchNorm statistics that are
not the identity), for tests and benchmarks; same seed, same bytes.

The graph is ``torchvision.models.resnet50`` in eval mode up to ``avgpool`` (v1.5: a
bottleneck's stride is on its 3x3 convolution), with every BatchNorm (eps 1e-5) folded into
its convolution; ``fc`` is dropped:

* input ``input``: float32 [N, 3, H, W], RGB, ImageNet mean/std (see models/README.md);
  N, H and W are dynamic, 224x224 is what the weights expect.
* output ``feature_map``: [N, 2048, h, w] after ``layer4`` (h = ceil(ceil(H/2)/16) ...: 7x7 at 224).
* output ``embedding``: [N, 2048], the global average of ``feature_map`` (not normalised).

``--check`` (needs torch and torchvision) loads the same weights into
``torchvision.models.resnet50`` and compares its forward pass up to ``avgpool`` with
onnxruntime's, on random tensors and on photos.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

import onnx_tools

# (blocks, width, stride of the first block) for layer1..layer4; a bottleneck outputs 4 * width.
LAYERS = [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)]
EXPANSION, STEM_CHANNELS, EMBEDDING_DIM, NUM_CLASSES, BN_EPS = 4, 64, 2048, 1000, 1e-5
RESIZE, INPUT_SIZE = 256, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # on the 0..1 scale
TOLERANCE = 1e-4
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class CheckpointError(ValueError):
    """The file is not a ResNet50 state dict; the message is one line."""


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of torchvision's ResNet50 state dict that the graph uses, in graph order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out_ch: int, in_ch: int, kernel: int) -> None:
        shapes[f"{conv}.weight"] = (out_ch, in_ch, kernel, kernel)
        shapes.update({f"{bn}.{k}": (out_ch,) for k in BN_KEYS})

    conv_bn("conv1", "bn1", STEM_CHANNELS, 3, 7)
    in_ch = STEM_CHANNELS
    for li, (blocks, width, _) in enumerate(LAYERS, 1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", width, in_ch, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", width * EXPANSION, width, 1)
            if b == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", width * EXPANSION, in_ch, 1)
            in_ch = width * EXPANSION
    return shapes


def _ignored(key: str) -> bool:
    """Entries a ResNet50 checkpoint may carry that the feature extractor does not use."""
    return key in ("fc.weight", "fc.bias") or key.endswith(".num_batches_tracked")


def _listing(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def validate(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Check names and shapes against :func:`expected_shapes`; return the state without the
    ``module.`` prefix that ``DataParallel`` checkpoints add. Raises :class:`CheckpointError`."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    shapes = expected_shapes()
    missing = [k for k in shapes if k not in state]
    extra = sorted(k for k in state if k not in shapes and not _ignored(k))
    wrong = [f"{k} is {tuple(state[k].shape)}, not {shapes[k]}"
             for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    not_float = sorted(k for k in shapes if k in state and state[k].dtype.kind != "f")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected ({_listing(extra)})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape ({_listing(wrong)})")
    if not_float:
        problems.append(f"{len(not_float)} not floating point ({_listing(not_float)})")
    if problems:
        raise CheckpointError(f"{source} is not a torchvision ResNet50 state dict: tensors "
                              + "; ".join(problems))
    return state


def random_state(seed: int) -> dict[str, np.ndarray]:
    """A complete torchvision ResNet50 state dict (float32) with random weights.

    Convolutions: He normal with fan_out, as torchvision initialises them. BatchNorm: gamma,
    beta, running mean and running variance all drawn at random, so that folding is exercised.
    The last BatchNorm of each residual branch gets a small gamma (like ``zero_init_residual``,
    but not zero), so activations stay O(1) through the 16 blocks instead of growing with depth;
    beta and the running means are small, because larger per-channel offsets swamp the part of
    the pooled features that depends on the picture (every embedding would point the same way:
    pairwise cosine 0.998 with offsets of 0.1-0.2 against about 0.97 with these).
    numpy's PCG64 stream and the float64 -> float32 cast are the same on every platform, so a
    seed gives the same bytes everywhere.
    """
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for key, shape in expected_shapes().items():
        if key.endswith(".weight") and len(shape) == 4:
            fan_out = shape[0] * shape[2] * shape[3]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)
        elif key.endswith(".weight"):  # BatchNorm gamma
            residual_end = key.endswith(".bn3.weight")
            value = rng.uniform(0.1, 0.3, shape) if residual_end else rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".bias"):
            value = rng.normal(0.0, 0.02, shape)
        elif key.endswith(".running_mean"):
            value = rng.normal(0.0, 0.05, shape)
        else:  # running_var
            value = rng.uniform(0.5, 2.0, shape)
        state[key] = value.astype(np.float32)
        if key.endswith(".running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = np.array(100, np.int64)
    state["fc.weight"] = (rng.standard_normal((NUM_CLASSES, EMBEDDING_DIM)) * 0.01).astype(np.float32)
    state["fc.bias"] = np.zeros(NUM_CLASSES, np.float32)
    return state


def build(state: dict[str, np.ndarray], source: str) -> onnx.ModelProto:
    """The ONNX graph of a validated state dict (see :func:`validate`)."""
    g = onnx_tools.GraphBuilder()

    def conv_bn(x: str, conv: str, bn: str, *, stride: int = 1, pads: int = 0) -> str:
        return g.conv_bn(x, state[f"{conv}.weight"], onnx_tools.bn_params(state, bn), eps=BN_EPS,
                         stride=stride, pads=pads, name=conv)

    x = g.relu(conv_bn("input", "conv1", "bn1", stride=2, pads=3), "relu")
    x = g.max_pool(x, 3, 2, pads=1, out="maxpool")
    for li, (blocks, _, stride) in enumerate(LAYERS, 1):
        for b in range(blocks):
            p, s = f"layer{li}.{b}", stride if b == 0 else 1
            h = g.relu(conv_bn(x, f"{p}.conv1", f"{p}.bn1"), f"{p}.relu1")
            h = g.relu(conv_bn(h, f"{p}.conv2", f"{p}.bn2", stride=s, pads=1), f"{p}.relu2")
            h = conv_bn(h, f"{p}.conv3", f"{p}.bn3")
            identity = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", stride=s) if b == 0 else x
            last = li == len(LAYERS) and b == blocks - 1
            x = g.relu(g.add(h, identity, f"{p}.add"), "feature_map" if last else f"{p}.out")
    g.flatten(g.global_average_pool(x, "avgpool"), "embedding")
    return g.finalize(
        inputs={"input": ["batch", 3, "height", "width"]},
        outputs={"feature_map": ["batch", EMBEDDING_DIM, "feature_height", "feature_width"],
                 "embedding": ["batch", EMBEDDING_DIM]},
        name="resnet50",
        doc=f"torchvision ResNet50 features (up to avgpool), exported from {source}",
        metadata={"source": source, "input_size": str(INPUT_SIZE), "color_order": "RGB",
                  "mean_0_1": ",".join(f"{v:g}" for v in MEAN),
                  "std_0_1": ",".join(f"{v:g}" for v in STD),
                  "resize": f"shorter side to {RESIZE} (PIL bilinear), centre crop input_size"})


# --- parity check against torchvision (only with --check) -------------------------------------

def _torch_features(net, x):
    """torchvision's ResNet forward up to avgpool: (feature_map, embedding)."""
    import torch

    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(x)))))
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        return fmap.numpy(), torch.flatten(net.avgpool(fmap), 1).numpy()


def _photos(folder: Path | None) -> list:
    """RGB PIL images: the files in ``folder``, else scikit-image's sample photos, else none."""
    from PIL import Image

    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return [Image.open(p).convert("RGB") for p in files[::max(1, len(files) // 8)][:8]]
    try:
        import skimage.data as data
    except ImportError:
        return []
    return [Image.fromarray(getattr(data, n)()).convert("RGB")
            for n in ("chelsea", "coffee", "rocket", "astronaut")]


def _torchvision_state(state: dict[str, np.ndarray], weights: Path | None, tmp: Path) -> dict:
    """The state dict as torch itself reads it: ``torch.load`` of WEIGHTS, or for ``--random``
    of the random weights saved with ``torch.save`` (which also cross-checks our loader)."""
    import torch

    if weights is None or weights.suffix == ".safetensors":
        if weights is not None:
            try:
                from safetensors.torch import load_file
                return load_file(str(weights))
            except ImportError:
                pass
        path = tmp / "resnet50-random.pth"
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
        reread = onnx_tools.load_state_dict(path)
        if reread.keys() != state.keys() or any(not np.array_equal(reread[k], v) for k, v in state.items()):
            raise AssertionError("onnx_tools.load_state_dict misread a file written by torch.save")
        return torch.load(path, weights_only=True)
    loaded = torch.load(weights, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def check(model_path: Path, state: dict[str, np.ndarray], weights: Path | None,
          photos: Path | None) -> bool:
    """Compare onnxruntime with torchvision; print each case; True if all are within tolerance.

    The tolerance is ``TOLERANCE * max(1, max |reference|)`` per output: absolute 1e-4 for
    values up to 1, relative to the largest value above that. float32 rounding error grows with
    the magnitude of what is summed (ImageNet ResNet50's layer4 activations reach tens), so a
    fixed absolute bound would be stricter than float32 itself for large activations.
    """
    import onnxruntime as ort
    import torch
    import torchvision
    from torchvision import transforms

    torch.set_num_threads(2)
    net = torchvision.models.resnet50(weights=None).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tv_state = _torchvision_state(state, weights, Path(tmp))
    result = net.load_state_dict(tv_state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"fc.weight", "fc.bias"}:
        raise AssertionError(f"torchvision did not take the weights: {result}")
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    to_tensor = transforms.Compose([
        transforms.Resize(RESIZE, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(INPUT_SIZE), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    rng = np.random.default_rng(0)
    cases = {
        "random N(0,1) 4x3x224x224": rng.standard_normal((4, 3, 224, 224)).astype(np.float32),
        "random N(0,1) 1x3x224x224": rng.standard_normal((1, 3, 224, 224)).astype(np.float32),
        "random N(0,1) 2x3x193x257": rng.standard_normal((2, 3, 193, 257)).astype(np.float32),
    }
    images = _photos(photos)
    if images:
        cases[f"{len(images)} photos, torchvision transforms"] = np.stack(
            [to_tensor(img).numpy() for img in images])
    else:
        print("no photos (give --photos or install scikit-image): random inputs only")
    ok = True
    for name, x in cases.items():
        ref_fmap, ref_emb = _torch_features(net, x)
        got_fmap, got_emb = sess.run(["feature_map", "embedding"], {"input": x})
        for output, ref, got in (("feature_map", ref_fmap, got_fmap), ("embedding", ref_emb, got_emb)):
            if ref.shape != got.shape:
                print(f"{name}: {output} shape {got.shape}, torchvision {ref.shape}")
                ok = False
                continue
            diff, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
            limit = TOLERANCE * max(1.0, top)
            ok &= diff <= limit
            print(f"{name}: {output} {got.shape} max|diff| {diff:.2e} (max|value| {top:.3g}, "
                  f"relative {diff / max(top, 1e-30):.1e}, limit {limit:.1e})")
    if images:
        _compare_imgsim_preprocessing(sess, images, to_tensor)
    return ok


def _compare_imgsim_preprocessing(sess, images, to_tensor) -> None:
    """Information only: how far imgsim's own preprocessing is from torchvision's transforms."""
    try:
        from imgsim.images import to_array
        from imgsim.models import spec_for
        prep = spec_for("resnet50").preprocess
    except Exception as e:  # imgsim not installed in this environment
        print(f"(imgsim not importable, preprocessing not compared: {e})")
        return
    ours = np.stack([to_array(img, prep) for img in images])
    ref = np.stack([to_tensor(img).numpy() for img in images])
    a, b = (sess.run(["embedding"], {"input": x})[0] for x in (ours, ref))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"imgsim preprocessing vs torchvision transforms: input max|diff| "
          f"{np.abs(ours - ref).max():.3f}, embedding cosine min {cos.min():.5f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", type=Path, nargs="?",
                    help="torchvision ResNet50 state dict (.pth/.pt) or .safetensors")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--random", type=int, metavar="SEED",
                    help="export random weights made from SEED instead of reading WEIGHTS")
    ap.add_argument("--check", action="store_true",
                    help="compare with torchvision (needs torch, torchvision); fail if max abs diff > "
                         f"{TOLERANCE:g} x max(1, max |value|)")
    ap.add_argument("--photos", type=Path, help="folder of photos for --check "
                    "(default: scikit-image's sample photos, if installed)")
    args = ap.parse_args(argv)
    if (args.weights is None) == (args.random is None):
        ap.error("give either WEIGHTS or --random SEED")
    try:
        if args.random is not None:
            state, source = random_state(args.random), f"random weights (seed {args.random})"
        else:
            if not args.weights.is_file():
                raise CheckpointError(f"no such file: {args.weights}")
            digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()
            source = f"{args.weights.name} (sha256 {digest})"
            try:
                state = onnx_tools.load_state_dict(args.weights)
            except Exception as e:
                raise CheckpointError(f"cannot read {args.weights}: {e}") from None
            state = validate(state, str(args.weights))
        onnx_tools.save(build(state, source), args.output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = args.output.read_bytes()
    print(f"wrote {args.output}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    if args.check:
        try:
            ok = check(args.output, state, args.weights, args.photos)
        except ImportError as e:
            print(f"error: --check needs torch and torchvision: {e}", file=sys.stderr)
            return 2
        print("parity: " + ("ok" if ok else "FAILED") + f" (tolerance {TOLERANCE:g} x max(1, max|value|))")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
