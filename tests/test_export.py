"""scripts/export_resnet50.py and scripts/quantize.py, without torch.

A random-weight ResNet50 is exported by the script with torch made unimportable, checked for its
outputs, dynamic shapes and byte-for-byte determinism, then quantized to INT8 on a few photos, and
both files are used through imgsim's CLI to index and search the photos. The checkpoint loader is
fed a pickle that tries to run code, checkpoints with the wrong tensors, and safetensors files
written here with numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import export_resnet50
import numpy as np
import onnx
import onnx_tools
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from imgsim import models
from imgsim.cli import cli

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SEED = 7
CALIBRATION_PHOTOS = 6
MIN_COSINE = 0.999
"""Floor for cosine(fp32, int8) per photo. The random-weight model measures 0.9999; its pooled
features are alike for all pictures (the nearest other photo is at 0.97-0.998), so the test also
asks that each int8 vector finds its own fp32 vector first."""


@pytest.fixture(scope="session")
def no_torch(tmp_path_factory) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import torch`` and ``import torchvision`` fail."""
    folder = tmp_path_factory.mktemp("no-torch")
    for name in ("torch", "torchvision"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return folder


def run_script(no_torch: Path, script: str, *args) -> subprocess.CompletedProcess:
    path = [str(no_torch), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout, written independently of the loader under test: an 8-byte
    little-endian header length, a JSON header, then the raw little-endian tensor bytes."""
    codes = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
             np.dtype("<i8"): "I64", np.dtype("<i4"): "I32"}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, no_torch) -> Path:
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.onnx"
    done = run_script(no_torch, "export_resnet50.py", "--random", SEED, "-o", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {path}: {path.stat().st_size} bytes, sha256 {sha256(path)}"
    return path


def test_export_has_both_outputs_and_dynamic_shapes(exported):
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["feature_map", "embedding"]
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    fmap, emb = sess.run(["feature_map", "embedding"], {"input": x})
    assert fmap.shape == (3, 2048, 7, 7) and emb.shape == (3, 2048)
    np.testing.assert_allclose(emb, fmap.mean(axis=(2, 3)), atol=1e-5)
    (single,) = sess.run(["embedding"], {"input": x[1:2]})
    assert single.shape == (1, 2048)
    np.testing.assert_allclose(single[0], emb[1], atol=1e-5)
    (odd,) = sess.run(["feature_map"], {"input": x[:1, :, :160, :193]})
    assert odd.shape == (1, 2048, 5, 7)
    assert 0.05 < float(emb.std()) < 10, "random weights should give O(1) features"
    props = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert props["source"] == f"random weights (seed {SEED})"


def test_export_is_deterministic(exported, tmp_path, no_torch):
    again = tmp_path / "again.onnx"
    assert run_script(no_torch, "export_resnet50.py", "--random", SEED, "-o", again).returncode == 0
    assert sha256(again) == sha256(exported)
    other = tmp_path / "other.onnx"
    assert run_script(no_torch, "export_resnet50.py", "--random", SEED + 1, "-o", other).returncode == 0
    assert sha256(other) != sha256(exported)


def test_safetensors_round_trip(tmp_path):
    tensors = {"a.weight": np.arange(24, dtype="<f4").reshape(2, 3, 4), "b": np.array([1.5, -2], "<f2"),
               "c.num_batches_tracked": np.array(7, "<i8"), "empty": np.zeros((0, 3), "<f4")}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    loaded = onnx_tools.load_state_dict(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_export_from_safetensors_equals_random_export(exported, tmp_path, no_torch):
    weights = tmp_path / "resnet50.safetensors"
    write_safetensors(weights, export_resnet50.random_state(SEED))
    out = tmp_path / "from-file.onnx"
    done = run_script(no_torch, "export_resnet50.py", weights, "-o", out)
    assert done.returncode == 0, done.stderr

    def graph(path):
        model = onnx.load(str(path))
        del model.metadata_props[:]
        model.doc_string = ""
        return model.SerializeToString(deterministic=True)

    assert graph(out) == graph(exported)
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert props["source"] == f"resnet50.safetensors (sha256 {sha256(weights)})"


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_loader_refuses_a_pickle_that_runs_code(tmp_path, no_torch, layout):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"conv1.weight": RunsCode(marker)}, protocol=2)
    checkpoint = tmp_path / "resnet50-evil.pth"
    if layout == "zip":
        with zipfile.ZipFile(checkpoint, "w") as zf:
            zf.writestr("resnet50-evil/data.pkl", payload)
            zf.writestr("resnet50-evil/version", "3\n")
    else:
        checkpoint.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="system, which is not allowed"):
        onnx_tools.load_state_dict(checkpoint)
    done = run_script(no_torch, "export_resnet50.py", checkpoint, "-o", tmp_path / "x.onnx")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot read {checkpoint}: ") and done.stderr.count("\n") == 1
    assert "not allowed" in done.stderr
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()


def test_checkpoints_with_wrong_tensors_are_refused(tmp_path, no_torch):
    small = tmp_path / "small.safetensors"
    write_safetensors(small, {"conv1.weight": np.zeros((64, 3, 7, 7), "<f4"), "head.weight": np.zeros(3, "<f4")})
    done = run_script(no_torch, "export_resnet50.py", small, "-o", tmp_path / "x.onnx")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {small} is not a torchvision ResNet50 state dict: tensors ")
    assert "264 missing (bn1.weight, bn1.bias, bn1.running_mean and 261 more)" in done.stderr
    assert "1 unexpected (head.weight)" in done.stderr

    missing = run_script(no_torch, "export_resnet50.py", tmp_path / "nowhere.pth", "-o", tmp_path / "x.onnx")
    assert (missing.returncode, missing.stderr) == (1, f"error: no such file: {tmp_path / 'nowhere.pth'}\n")

    state = export_resnet50.random_state(0)
    state["layer2.0.conv2.weight"] = state["layer2.0.conv2.weight"][:, :, :1]
    with pytest.raises(export_resnet50.CheckpointError,
                       match=r"1 with the wrong shape \(layer2.0.conv2.weight is \(128, 128, 1, 3\), "
                             r"not \(128, 128, 3, 3\)\)"):
        export_resnet50.validate(state, "x.pth")
    wrapped = {f"module.{k}": v for k, v in export_resnet50.random_state(0).items()}
    assert export_resnet50.validate(wrapped, "x.pth").keys() == export_resnet50.random_state(0).keys()


@pytest.fixture(scope="module")
def model_dir(exported, photos_master, tmp_path_factory, no_torch) -> Path:
    """A models folder holding the random resnet50.onnx and its INT8 quantization, calibrated on a
    few of the photos and evaluated on all of them."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copyfile(exported, folder / "resnet50.onnx")
    calibration = tmp_path_factory.mktemp("calibration")
    for path in sorted(photos_master.iterdir())[:CALIBRATION_PHOTOS]:
        shutil.copy(path, calibration)
    done = run_script(no_torch, "quantize.py", folder / "resnet50.onnx", "--calibrate", calibration,
                      "--eval", photos_master, "-o", folder / "resnet50.int8.onnx", "--min-overlap", "0.5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"calibrated on {CALIBRATION_PHOTOS} pictures" in done.stdout
    assert "top-10 neighbour overlap" in done.stdout
    return folder


def test_int8_embeddings_stay_close_to_fp32(model_dir, photos_master):
    spec = models.spec_for("resnet50")
    fp32 = models.Model(spec, model_dir / "resnet50.onnx", "")
    int8 = models.Model(spec, model_dir / "resnet50.int8.onnx", "")
    from imgsim.images import load_array

    batch = np.stack([load_array(p, spec.preprocess)[0] for p in sorted(photos_master.iterdir())])
    a, b = fp32.embed(batch), int8.embed(batch)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > MIN_COSINE, cosine
    assert list(np.argmax(b @ a.T, axis=1)) == list(range(len(batch))), "int8 should find its own fp32 vector"
    quantized = onnx.load(str(model_dir / "resnet50.int8.onnx"), load_external_data=False)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert [o.name for o in quantized.graph.output] == ["feature_map", "embedding"]
    assert (model_dir / "resnet50.int8.onnx").stat().st_size < (model_dir / "resnet50.onnx").stat().st_size / 3


@pytest.mark.parametrize("model", ["resnet50", "resnet50-int8"])
def test_index_and_search_with_exported_models(model_dir, photos, tmp_path, monkeypatch, model):
    monkeypatch.setenv(models.MODELS_ENV, str(model_dir))
    found = models.find_file(models.spec_for(model))
    if found is None or found.parent != model_dir:
        pytest.skip(f"{found} shadows the test's {model} model")
    runner, index = CliRunner(), tmp_path / "idx"
    done = runner.invoke(cli, ["index", str(photos), "--index", str(index), "--model", model])
    assert done.exit_code == 0, done.output
    info = json.loads(runner.invoke(cli, ["info", "--index", str(index), "--json"]).stdout)
    assert info["model"] == model and info["dimensions"] == 2048
    for query in ("coffee.jpg", "astronaut.jpg"):
        lines = runner.invoke(cli, ["search", str(photos / query), "--index", str(index), "--json", "-k", "3"]).stdout
        first = json.loads(lines.splitlines()[0])
        assert first["path"] == query and first["score"] == pytest.approx(1.0, abs=1e-4)
