"""scripts/quantize.py's calibration, on a small Conv model: every calibration picture counts.

onnxruntime's MinMax calibrator, given ``CalibMaxIntermediateOutputs``, threw away what it had
collected each time that many batches were reached without computing ranges (onnxruntime issue
18893): the ranges came from the last partial group of batches only, and a number of batches that
was a multiple of it failed with ``No data is collected``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantize

SIZE = 8


def write_conv_model(path: Path) -> None:
    """input (N, 3, 8, 8) -> 1x1 Conv (4 channels) -> ReLU = feature_map -> average = embedding."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["conv"], name="conv"),
            helper.make_node("Relu", ["conv"], ["feature_map"], name="relu"),
            helper.make_node("GlobalAveragePool", ["feature_map"], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten"),
        ],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("feature_map", TensorProto.FLOAT, ["N", 4, SIZE, SIZE]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def input_range(model: onnx.ModelProto) -> float:
    """max - min of the calibrated range of ``input``, from its QuantizeLinear scale (uint8: 255 steps)."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input"]
    return float(initializers[node.input[1]]) * 255


def pictures(count: int, outlier_batch: int) -> np.ndarray:
    """`count` inputs in [-1, 1], except one value of 10 in batch `outlier_batch` (of quantize.BATCH)."""
    arrays = np.random.default_rng(1).uniform(-1, 1, size=(count, 3, SIZE, SIZE)).astype(np.float32)
    arrays[outlier_batch * quantize.BATCH, 0, 0, 0] = 10.0
    return arrays


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    write_conv_model(path)
    return path


@pytest.mark.parametrize("batches", [4, 5, 8])
def test_calibration_ranges_cover_every_batch(conv_model, tmp_path, batches):
    """Whichever batch holds the largest value, and however many batches there are (4 and 8 used to
    fail outright), the calibrated range reaches it."""
    for outlier_batch in sorted({0, batches // 2, batches - 1}):
        calibration = pictures(batches * quantize.BATCH, outlier_batch)
        out = tmp_path / f"conv-{outlier_batch}.int8.onnx"
        quantize.quantize(conv_model, out, calibration)
        expected = float(calibration.max() - calibration.min())
        assert input_range(onnx.load(str(out))) == pytest.approx(expected, rel=1e-5), outlier_batch


def test_metadata_counts_the_pictures_calibrated_on(conv_model, tmp_path):
    calibration = pictures(3 * quantize.BATCH + 5, 3)  # a partial last batch holds the largest value
    out = tmp_path / "conv.int8.onnx"
    quantize.quantize(conv_model, out, calibration)
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert f"minmax calibration on {len(calibration)} pictures" in props["quantization"]
    assert input_range(model) == pytest.approx(float(calibration.max() - calibration.min()), rel=1e-5)
