"""Quantize an imgsim model to INT8 and measure what it costs in search quality.

    python scripts/quantize.py MODEL.onnx --calibrate FOLDER -o MODEL.int8.onnx
        [--model-name NAME] [--eval FOLDER] [--min-overlap 0.9]

onnxruntime static quantization: QDQ format, per-channel symmetric INT8 weights, activations
(``--activations``, default uint8) with ranges calibrated on the pictures in FOLDER, each
decoded and preprocessed exactly as imgsim does for that model (``load_array`` with the
catalogue's preprocessing). The model is first run through onnxruntime's
``quant_pre_process`` (ONNX shape inference and graph optimisation; the symbolic shape
inference, which needs sympy, is skipped: these graphs have only standard ops). The pooling
that makes ``embedding`` is left in float (see ``UNQUANTIZED_OPS``), and so are the first
``--float-convs`` convolutions; everything else, ``feature_map`` included, is quantized.

Then, on the evaluation pictures (default: the calibration folder), it embeds every picture with
both models, as imgsim does (L2-normalised), and prints:

* the cosine between each picture's fp32 and int8 embedding (mean, min);
* the mean overlap of the top-10 neighbour lists (exact inner product, the picture itself left
  out) of an fp32 and an int8 index of the same pictures;
* how often an int8 query finds its own fp32 vector first among all fp32 vectors.

It exits with status 1 if the top-10 overlap is under ``--min-overlap``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

import onnx_tools
from imgsim.errors import ImageError
from imgsim.images import discover, load_array
from imgsim.models import CATALOGUE, Model, ModelSpec, spec_for

ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}
UNQUANTIZED_OPS = {"GlobalAveragePool", "Flatten"}
"""The pooling that makes ``embedding`` from ``feature_map``, and the Flatten after it, stay in
float: quantized, they would round ``embedding`` itself to 256 levels per tensor, which only adds
error (nothing after them runs in INT8, and pooling is a tiny part of the work)."""
FLOAT_CONVS = {"efficientnet-lite0": 6}
"""``--float-convs`` when not given. EfficientNet-Lite0's stem and first two blocks (6 convolutions
at 112x112, 56x56) lose the most in INT8; kept in float they lift the top-10 overlap from 0.92 to
0.96 for about 15 % of the INT8 speed (models/README.md)."""
TOP_K, BATCH = 10, 16


def spec_of(model: Path, name: str | None) -> ModelSpec:
    """The catalogue entry whose preprocessing the calibration must use."""
    if name:
        return spec_for(name)
    matches = [s for s in CATALOGUE.values() if s.filename == model.name]
    if len(matches) != 1:
        raise SystemExit(f"error: cannot tell which catalogue model {model.name} is: give --model-name")
    return matches[0]


def load_folder(folder: Path, spec: ModelSpec, limit: int | None = None) -> tuple[list[Path], np.ndarray]:
    """Every readable picture under ``folder`` (sorted), preprocessed for ``spec``: (paths, NCHW)."""
    paths, arrays = [], []
    for path in discover(folder):
        if limit is not None and len(paths) >= limit:
            break
        try:
            array, _ = load_array(path, spec.preprocess)
        except ImageError as e:
            print(f"skipped {path}: {e}", file=sys.stderr)
            continue
        paths.append(path)
        arrays.append(array)
    if not arrays:
        raise SystemExit(f"error: no readable pictures in {folder}")
    return paths, np.stack(arrays)


class BatchReader(CalibrationDataReader):
    """Feeds the preprocessed pictures to the calibrator, ``size`` at a time (the histogram
    calibrators need every batch to have the same size)."""

    def __init__(self, arrays: np.ndarray, size: int):
        self.batches = iter([arrays[i:i + size] for i in range(0, len(arrays), size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def nodes_kept_in_float(graph: onnx.GraphProto, float_convs: int) -> list[str]:
    """``UNQUANTIZED_OPS`` nodes, the first ``float_convs`` convolutions in graph order, and the
    Relu/Clip right after each of them (left quantized alone, such an activation gets a range
    calibrated for the wrong tensor and costs more fidelity than it saves)."""
    keep = [n for n in graph.node if n.op_type in UNQUANTIZED_OPS]
    convs = [n for n in graph.node if n.op_type == "Conv"][:float_convs]
    outputs = {o for n in convs for o in n.output}
    keep += convs + [n for n in graph.node if n.op_type in ("Relu", "Clip") and n.input[0] in outputs]
    return [n.name for n in keep]


def quantize(model: Path, output: Path, calibration: np.ndarray, *, activations: str = "uint8",
             method: str = "minmax", pre_process: bool = True, float_convs: int = 0) -> None:
    """Write the INT8 model; its metadata says how it was made, its bytes depend only on the inputs."""
    source = onnx.load(str(model), load_external_data=False)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = model
        if pre_process:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        exclude = nodes_kept_in_float(onnx.load(str(prepared)).graph, float_convs)
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(str(prepared), str(quantized), BatchReader(calibration, BATCH if method == "minmax" else 1),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=ACTIVATIONS[activations],
                        calibrate_method=METHODS[method], nodes_to_exclude=exclude)
        # No ``CalibMaxIntermediateOutputs``: with it, onnxruntime's MinMax calibrator drops what it
        # collected every N batches without computing ranges (onnxruntime issue 18893), so only the
        # last partial group counted. It keeps just a min and a max per tensor and batch anyway.
        result = onnx.load(str(quantized))
    props = {p.key: p.value for p in source.metadata_props}
    props["quantization"] = (f"onnxruntime {ort.__version__} quantize_static: QDQ, per-channel int8 weights, "
                             f"{activations} activations, {method} calibration on {len(calibration)} pictures"
                             + (f", first {float_convs} convolutions in float" if float_convs else "")
                             + (", quant_pre_process" if pre_process else ""))
    del result.metadata_props[:]
    onnx.helper.set_model_props(result, props)
    result.doc_string = source.doc_string
    # quant_pre_process saves through onnxruntime, which declares every operator domain it knows
    # (training, preview, aten, ...); an older onnxruntime may refuse versions it has not heard of.
    used = {n.domain for n in result.graph.node} | {""}
    kept = [o for o in result.opset_import if o.domain in used]
    del result.opset_import[:]
    result.opset_import.extend(kept)
    onnx.checker.check_model(result)
    onnx_tools.save(result, output)


@dataclass
class Fidelity:
    count: int
    cosine_mean: float
    cosine_min: float
    cosine_min_path: Path
    overlap_mean: float
    overlap_min: float
    self_top1: float


def top_k(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest rows by inner product, itself excluded (exact search)."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def embed_all(model: Model, arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([model.embed(arrays[i:i + BATCH]) for i in range(0, len(arrays), BATCH)])


def fidelity(fp32: Model, int8: Model, paths: list[Path], arrays: np.ndarray) -> Fidelity:
    a, b = embed_all(fp32, arrays), embed_all(int8, arrays)
    cosine = (a * b).sum(axis=1)
    k = min(TOP_K, len(paths) - 1)
    na, nb = top_k(a, k), top_k(b, k)
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(na, nb)])
    self_top1 = float(np.mean(np.argmax(b @ a.T, axis=1) == np.arange(len(paths))))
    worst = int(np.argmin(cosine))
    return Fidelity(len(paths), float(cosine.mean()), float(cosine.min()), paths[worst],
                    float(overlap.mean()), float(overlap.min()), self_top1)


def describe(path: Path) -> str:
    data = path.read_bytes()
    return f"{path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="the fp32 ONNX model")
    ap.add_argument("--calibrate", type=Path, required=True, metavar="FOLDER",
                    help="pictures to calibrate activation ranges on (a few hundred is plenty)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--model-name", help="catalogue name, for the preprocessing (default: found "
                    "from the file name, e.g. resnet50.onnx -> resnet50)")
    ap.add_argument("--eval", type=Path, metavar="FOLDER", help="pictures to measure fidelity on "
                    "(default: the calibration folder)")
    ap.add_argument("--min-overlap", type=float, default=0.9,
                    help=f"fail if the mean top-{TOP_K} overlap is lower (default 0.9)")
    ap.add_argument("--activations", choices=sorted(ACTIVATIONS), default="uint8",
                    help="activation type (default uint8: as faithful as int8, and onnxruntime runs it "
                         "faster on x86; see models/README.md)")
    ap.add_argument("--method", choices=sorted(METHODS), default="minmax", help="calibration (default minmax)")
    ap.add_argument("--max-calibration", type=int, metavar="N", help="use at most N calibration pictures")
    ap.add_argument("--float-convs", type=int, metavar="N",
                    help="keep the first N convolutions (and their activations) in float32 (default: "
                         + ", ".join(f"{n} for {m}" for m, n in FLOAT_CONVS.items()) + ", else 0)")
    ap.add_argument("--no-pre-process", dest="pre_process", action="store_false",
                    help="skip onnxruntime's quant_pre_process")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(f"error: no such file: {args.model}", file=sys.stderr)
        return 1
    for folder in (args.calibrate, args.eval):
        if folder is not None and not folder.is_dir():
            print(f"error: no such folder: {folder}", file=sys.stderr)
            return 1
    spec = spec_of(args.model, args.model_name)
    if args.float_convs is None:
        args.float_convs = FLOAT_CONVS.get(spec.name, 0)
    started = time.perf_counter()
    calibration_paths, calibration = load_folder(args.calibrate, spec, args.max_calibration)
    quantize(args.model, args.output, calibration, activations=args.activations, method=args.method,
             pre_process=args.pre_process, float_convs=args.float_convs)
    print(f"wrote {describe(args.output)}")
    print(f"calibrated on {len(calibration)} pictures from {args.calibrate} ({args.activations} activations, "
          f"{args.method}, first {args.float_convs} convolutions in float) in {time.perf_counter() - started:.0f} s")
    eval_folder = args.eval or args.calibrate
    paths, arrays = load_folder(args.eval, spec) if args.eval else (calibration_paths, calibration)
    fp32 = Model(spec, args.model, "")
    int8 = Model(spec, args.output, "")
    f = fidelity(fp32, int8, paths, arrays)
    print(f"fidelity on {f.count} pictures from {eval_folder}:")
    print(f"  cosine(fp32, int8): mean {f.cosine_mean:.4f}, min {f.cosine_min:.4f} ({f.cosine_min_path.name})")
    print(f"  top-{TOP_K} neighbour overlap, fp32 vs int8 index: mean {f.overlap_mean:.3f}, min {f.overlap_min:.1f}")
    print(f"  int8 query finds its own fp32 vector first: {f.self_top1:.1%}")
    if f.overlap_mean < args.min_overlap:
        print(f"error: top-{TOP_K} overlap {f.overlap_mean:.3f} is under --min-overlap {args.min_overlap}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
