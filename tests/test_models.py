"""The model catalogue: listing, installing from a file or a URL (a local HTTP server), default choice."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imgsim.errors import ModelError
from imgsim.models import default_model, parse_pooling, pooling_regions, regions

from .conftest import TINY_MODEL, run


@pytest.fixture
def install_dir(tmp_path, monkeypatch):
    folder = tmp_path / "installed"
    monkeypatch.setenv("IMGSIM_MODELS", str(folder))
    return folder


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 for the duration of a test."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_list_shows_the_bundled_model_verified():
    rows = {r["name"]: r for r in map(json.loads, run("models", "--json").stdout.splitlines())}
    for name in ("efficientnet-lite0", "efficientnet-lite0-int8", "efficientnet-lite0-lw", "efficientnet-lite0-lw-int8"):
        bundled = rows[name]
        assert bundled["installed"] and bundled["verified"] is True and bundled["dimensions"] == 1280
    assert [name for name, row in rows.items() if row["default"]] == ["efficientnet-lite0-lw"]
    assert set(rows) >= {"efficientnet-lite0", "efficientnet-lite0-int8", "resnet50", "resnet50-int8"}
    assert rows["resnet50"]["dimensions"] == 2048
    plain = run("models").stdout
    assert "efficientnet-lite0" in plain and "sha256 verified" in plain


def test_add_from_file(install_dir, tiny_model_dir):
    source = tiny_model_dir / "tiny-test.onnx"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result = run("models", "add", TINY_MODEL, source, "--sha256", digest)
    assert result.exit_code == 0, result.output
    assert (install_dir / "tiny-test.onnx").read_bytes() == source.read_bytes()


def test_add_from_url_verifies_the_checksum(install_dir, tiny_model_dir, http_server):
    www, base = http_server
    data = (tiny_model_dir / "tiny-test.onnx").read_bytes()
    (www / "model.onnx").write_bytes(data)
    wrong = run("models", "add", TINY_MODEL, "--url", f"{base}/model.onnx", "--sha256", "0" * 64)
    assert wrong.exit_code == 1 and "does not match the given checksum" in wrong.stderr
    assert list(install_dir.iterdir()) == []  # nothing half-installed is left behind
    good = run("models", "add", TINY_MODEL, "--url", f"{base}/model.onnx", "--sha256", hashlib.sha256(data).hexdigest())
    assert good.exit_code == 0, good.output
    assert (install_dir / "tiny-test.onnx").read_bytes() == data
    missing = run("models", "add", TINY_MODEL, "--url", f"{base}/nope.onnx", "--sha256", "0" * 64)
    assert missing.exit_code == 1 and "download of" in missing.stderr


def test_add_refuses_what_is_not_a_model(install_dir, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    result = run("models", "add", TINY_MODEL, junk)
    assert result.exit_code == 1 and "not installed" not in result.stdout
    assert result.stderr.startswith(f"Error: {junk} is not a usable {TINY_MODEL} model (")
    assert str(install_dir) not in result.stderr, "the error must name the user's file, not the staged copy"
    assert not (install_dir / "tiny-test.onnx").exists()
    wrong = run("models", "add", TINY_MODEL, junk, "--sha256", "0" * 64)
    assert wrong.stderr.startswith(f"Error: sha256 of {junk} is ")
    assert run("models", "add", "vgg99", junk).exit_code == 1


def test_add_usage_errors(tmp_path):
    assert run("models", "add", TINY_MODEL).exit_code == 2
    assert run("models", "add", TINY_MODEL, "--url", "http://127.0.0.1:1/x").exit_code == 2  # no --sha256


def test_adding_the_model_that_becomes_the_default_says_so(install_dir, tiny_model_dir, monkeypatch):
    """Installing resnet50 makes it the default for new indexes: `models add` says so (with a file
    of random weights, nothing else would tell). Here the tiny model stands in for it."""
    from imgsim import models

    real = models.default_model
    monkeypatch.setattr(models, "default_model", lambda: ("tiny", "stands in") if
                        (install_dir / "tiny-test.onnx").exists() else real())
    source = tiny_model_dir / "tiny-test.onnx"
    result = run("models", "add", TINY_MODEL, source, "--sha256", hashlib.sha256(source.read_bytes()).hexdigest())
    assert result.exit_code == 0 and "tiny is now the default model for new indexes" in result.stderr
    again = run("models", "add", TINY_MODEL, source)  # installed already: no change of default, no notice
    assert "now the default" not in again.stderr


def test_default_is_resnet50_once_installed(install_dir, tmp_path, photos):
    assert default_model()[0] == "efficientnet-lite0-lw"
    result = run("index", photos, "--index", tmp_path / "a")
    assert "model: efficientnet-lite0-lw (bundled; " in result.stderr
    assert "resnet50 becomes the default once its ONNX file is installed" in result.stderr
    install_dir.mkdir()
    (install_dir / "resnet50.onnx").write_bytes(b"placeholder")
    assert default_model() == ("resnet50", "its ONNX file is installed")


def test_onnxruntime_writes_and_prints_nothing(tiny_index_in_subprocess, tmp_path):
    """onnxruntime's telemetry client stores a device id under ~/.cache, and prints a warning on
    every run where it cannot. imgsim turns it off: a home folder stays empty, and an unwritable
    one (as root, a process without root's capabilities) gets no warning."""
    command, photos = tiny_index_in_subprocess
    home = tmp_path / "home"
    home.mkdir()
    for name in ("index", "search"):
        args = ["index", str(photos), "--model", TINY_MODEL] if name == "index" else ["search", str(photos / "coffee.jpg"), "-k", "1"]
        done = subprocess.run([*command, *args], capture_output=True, text=True, env=_env(tmp_path, home))
        assert done.returncode == 0, done.stderr
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []

    os.chmod(home, 0o555)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to drop root's capabilities")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    done = subprocess.run([*prefix, *command, "search", str(photos / "coffee.jpg"), "-k", "1"],
                          capture_output=True, text=True, env=_env(tmp_path, home))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.split()[2].endswith("coffee.jpg")


def _env(tmp_path, home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_"))}
    return {**env, "HOME": str(home), "IMGSIM_INDEX": str(tmp_path / "i")}


@pytest.fixture
def tiny_index_in_subprocess(photos, tiny_model_dir, monkeypatch):
    """The imgsim CLI with the tiny model registered, as a separate process (tests/tiny_model.py)."""
    monkeypatch.setenv("IMGSIM_MODELS", str(tiny_model_dir))
    return [sys.executable, str(Path(__file__).with_name("tiny_model.py"))], photos


def test_pooling_names_with_regions():
    assert parse_pooling("gem3") == 3.0 and pooling_regions("gem3") == (0, 0)
    assert parse_pooling("gem3-rmac3-creg60") == 3.0 and pooling_regions("gem3-rmac3-creg60") == (3, 60)
    for bad in ("gem3-wobble", "gem3-rmac9", "gem3-creg5"):
        with pytest.raises(ModelError):
            parse_pooling(bad)
    assert regions(7, 7) == [(0, 0, 7, 7)]
    assert regions(7, 7, 2) == [(0, 0, 7, 7), (0, 0, 5, 5), (0, 2, 5, 5), (2, 0, 5, 5), (2, 2, 5, 5)]
    assert regions(7, 7, 1, 60) == [(0, 0, 7, 7), (1, 1, 4, 4)]


def test_the_default_model_and_why_are_listed():
    result = run("models")
    assert result.exit_code == 0
    assert "default: efficientnet-lite0-lw (bundled; Lite0 with learned whitening" in result.output


def test_a_model_file_is_hashed_once_per_version(install_dir, tiny_model_dir, monkeypatch):
    """Model.load takes the file's sha256 from a record of that very version of it (checked.py);
    any change to the file, even one that keeps its size and modification time, is hashed again."""
    from imgsim import checked
    from imgsim.models import Model

    monkeypatch.setattr(checked, "SETTLED_SECONDS", 0.0)  # record even a file written just now
    install_dir.mkdir()
    path = install_dir / "tiny-test.onnx"
    shutil.copy(tiny_model_dir / "tiny-test.onnx", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    files_hashed = []
    real_sha256 = hashlib.sha256

    def sha256(*data):  # a file is hashed from an empty start; record names are hashed from their key
        if not data:
            files_hashed.append(1)
        return real_sha256(*data)

    monkeypatch.setattr(checked.hashlib, "sha256", sha256)
    assert Model.load(TINY_MODEL, expect_sha256=digest).sha256 == digest
    assert len(files_hashed) == 1
    assert Model.load(TINY_MODEL, expect_sha256=digest).sha256 == digest
    assert len(files_hashed) == 1  # the record stood in for reading the file

    st = path.stat()
    with open(path, "r+b") as f:  # the same size and modification time, one byte changed
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelError, match="different tiny-test file"):
        Model.load(TINY_MODEL, expect_sha256=digest)


def _weighted_model(folder: Path) -> str:
    """A model with weights (a 48 x 48 matrix after the tiny model's pooling), registered as
    `tiny-weights`: its optimised copy keeps them in a file of their own."""
    import dataclasses

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from imgsim import models

    weights = numpy_helper.from_array(np.random.default_rng(1).standard_normal((48, 48)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["embedding"])],
        "weighted", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 48])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "tiny-weights.onnx")
    models.CATALOGUE["tiny-weights"] = dataclasses.replace(models.CATALOGUE[TINY_MODEL], name="tiny-weights",
                                                           filename="tiny-weights.onnx")
    return "tiny-weights"


@pytest.mark.parametrize("weighted", [False, True], ids=["no-weights", "weights"])
def test_the_optimised_model_is_kept_and_only_a_sound_copy_is_used(tmp_path, monkeypatch, install_dir, tiny_model_dir,
                                                                   weighted):
    """onnxruntime's optimised graph (and its weights, in a file beside it) is kept in the user's cache
    (models.OptimisedCache) and loaded as is at later starts, with the same embeddings; a copy that
    was altered is not used but made again."""
    import numpy as np

    from imgsim import models
    from imgsim.models import Model

    monkeypatch.setenv("IMGSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "CATALOGUE", dict(models.CATALOGUE))
    shutil.copytree(tiny_model_dir, install_dir)
    name = _weighted_model(install_dir) if weighted else TINY_MODEL
    batch = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    first = Model.load(name)
    expected = first.embed(batch)
    assert first._session._model_path == str(first.path)  # optimised here, and the copy kept
    copies = list((tmp_path / "cache" / "optimised").glob(f"{name}-*.onnx"))
    assert len(copies) == 1
    weights = copies[0].with_name(copies[0].name + ".data")
    assert weights.exists() == weighted
    second = Model.load(name)
    assert np.array_equal(second.embed(batch), expected)
    assert second._session._model_path == str(copies[0])

    for altered in [copies[0], weights] if weighted else [copies[0]]:
        sound = altered.read_bytes()
        altered.write_bytes(sound[:-1] + bytes([sound[-1] ^ 1]))
        again = Model.load(name)
        assert np.array_equal(again.embed(batch), expected)
        assert again._session._model_path == str(again.path)  # not the altered copy
        assert altered.read_bytes() == sound  # made again
        assert Model.load(name)._session._model_path == str(copies[0])

    monkeypatch.setenv("IMGSIM_OPTIMISED_CACHE", "0")
    assert Model.load(name)._session._model_path == str(first.path)
