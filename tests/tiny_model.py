"""The tiny test model: a genuine ONNX graph run by onnxruntime (average-pool the picture to 4x4,
flatten: 48 dimensions). Logic tests use it to stay fast; the tests that judge search quality use
the bundled EfficientNet-Lite0. `python tests/tiny_model.py ARGS` runs the imgsim CLI with it
registered, for tests that need a separate process (IMGSIM_MODELS must name a folder holding it)."""

from __future__ import annotations

from pathlib import Path

from imgsim import models
from imgsim.images import Preprocess

TINY_MODEL = "tiny-test"


def tiny_spec() -> models.ModelSpec:
    return models.ModelSpec(
        name=TINY_MODEL, filename="tiny-test.onnx", dim=48,
        preprocess=Preprocess(size=64, resize_to=64, resize="squash", interpolation="bilinear",
                              mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        description="test model: a 4x4 average of the picture",
        pooling="avg",
    )


def write_tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
            helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 48])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


if __name__ == "__main__":
    models.CATALOGUE[TINY_MODEL] = tiny_spec()
    from imgsim.cli import main

    main()
