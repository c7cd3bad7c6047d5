"""scripts/learn_whitening.py: the learned-whitening head written into a real model, checked against numpy,
and what it learns: altered copies end up closer to their pictures than other pictures are."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import learn_whitening  # noqa: E402

from imgsim import images as imgs  # noqa: E402
from imgsim.models import Model, gem, normalize  # noqa: E402


def _clipart(folder: Path, count: int) -> None:
    """Simple drawings on transparent pages, as clip-art is: shapes of random colours and places."""
    rng = np.random.default_rng(3)
    folder.mkdir()
    for i in range(count):
        img = Image.new("RGBA", (int(rng.integers(120, 400)), int(rng.integers(120, 400))), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, img.width - 40)), int(rng.integers(0, img.height - 40))
            box = (x0, y0, x0 + int(rng.integers(20, img.width - x0)), y0 + int(rng.integers(20, img.height - y0)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        img.save(folder / f"art{i:02d}.png")


def test_the_head_matches_numpy_and_brings_altered_copies_closer(tmp_path):
    _clipart(tmp_path / "art", 24)
    out = tmp_path / "lw.onnx"
    code = learn_whitening.main(["-o", str(out), "--clipart", str(tmp_path / "art"), "--pictures", "24",
                                 "--copies", "2", "--check"])
    assert code == 0 and out.stat().st_size > 13_000_000  # the whole backbone plus the 1280 x 1280 head

    base = Model.load("efficientnet-lite0")  # the script's default --base
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["feature_map", "embedding"]

    rng = np.random.default_rng(0)
    pictures = list(learn_whitening.pictures(tmp_path / "art", 24, rng))
    copies = [learn_whitening.alter(img, rng) for img in pictures]

    def vectors(images):
        arrays = np.stack([imgs.to_array(img, base.preprocess) for img in images])
        fmap, emb = session.run(["feature_map", "embedding"], {"input": arrays})
        return normalize(gem(fmap, learn_whitening.GEM_P)), normalize(emb)

    (plain, learned), (plain_copies, learned_copies) = vectors(pictures), vectors(copies)
    assert np.allclose(plain, base.embed(np.stack([imgs.to_array(img, base.preprocess) for img in pictures])),
                       atol=1e-5)  # the feature map is the base model's, untouched

    def margin(x, xc):
        """How much closer a copy is to its own picture than to the others, on average."""
        sims = xc @ x.T
        own = np.diag(sims)
        others = (sims.sum(axis=1) - own) / (len(x) - 1)
        return float(np.mean(own - others))

    assert margin(learned, learned_copies) > margin(plain, plain_copies)

    # the same head onto the INT8 backbone (how efficientnet-lite0-lw-int8 is made), checked against numpy too
    int8 = tmp_path / "lw.int8.onnx"
    assert learn_whitening.main(["-o", str(int8), "--base", "efficientnet-lite0-int8", "--head-from", str(out),
                                 "--clipart", str(tmp_path / "art"), "--check"]) == 0
    for a, b in zip(learn_whitening.head_of(out), learn_whitening.head_of(int8)):
        assert np.array_equal(a, b)


def test_a_file_without_a_head_is_one_line(tmp_path):
    (tmp_path / "not.onnx").write_bytes(b"not a model")
    try:
        learn_whitening.main(["-o", str(tmp_path / "x.onnx"), "--head-from", str(tmp_path / "not.onnx")])
    except SystemExit as e:
        assert "not a model with a learned-whitening head" in str(e)
    else:
        raise AssertionError("expected SystemExit")
    assert not (tmp_path / "x.onnx").exists()


def test_too_few_pictures_is_one_line(tmp_path, capsys):
    _clipart(tmp_path / "art", 3)
    try:
        learn_whitening.main(["-o", str(tmp_path / "x.onnx"), "--clipart", str(tmp_path / "art"), "--pictures", "5"])
    except SystemExit as e:
        assert "3 PNG files, need 5" in str(e)
    else:
        raise AssertionError("expected SystemExit")
    assert not (tmp_path / "x.onnx").exists()


def test_bad_arguments_are_one_line_before_any_work(tmp_path):
    _clipart(tmp_path / "art", 4)
    (tmp_path / "a-file").write_text("x")
    cases = {
        ("-o", str(tmp_path / "a-file" / "lw.onnx"), "--clipart", str(tmp_path / "art"), "--pictures", "4"):
            "cannot write there",
        ("-o", str(tmp_path / "x.onnx"), "--clipart", str(tmp_path / "missing")): "no such folder",
        ("-o", str(tmp_path / "x.onnx"), "--base", "nope"): "unknown model 'nope'",
        ("-o", str(tmp_path), "--clipart", str(tmp_path / "art")): "is a folder",
        ("-o", str(Model.load("efficientnet-lite0").path)): "is the base model's own file",
        ("-o", str(tmp_path / "x.onnx"), "--base", "efficientnet-lite0-lw", "--head-from",
         str(Path(__file__).resolve().parents[1] / "models" / "efficientnet-lite0-lw.onnx")):
            "has a learned-whitening head already",
    }
    for argv, message in cases.items():
        try:
            learn_whitening.main(list(argv))
        except SystemExit as e:
            assert message in str(e) and "\n" not in str(e), (argv, e)
        else:
            raise AssertionError(f"expected SystemExit for {argv}")
    assert not (tmp_path / "x.onnx").exists()


def test_misused_options_exit_2_and_a_head_of_the_wrong_size_is_refused(tmp_path, capsys):
    for argv in (["--shrinkage", "0"], ["--shrinkage", "-1"], ["--pictures", "-1"], ["--copies", "0"],
                 ["--head-from", "x.onnx", "--learn-from-model", "efficientnet-lite0"]):
        try:
            learn_whitening.main(["-o", str(tmp_path / "x.onnx"), *argv])
        except SystemExit as e:
            assert e.code == 2, argv
        else:
            raise AssertionError(f"expected a usage error for {argv}")
    head = tmp_path / "small-head.onnx"  # a head learned for 8-dimensional descriptors
    import onnx
    from onnx import helper, numpy_helper
    graph = helper.make_graph([], "g", [], [], initializer=[
        numpy_helper.from_array(np.zeros(8, np.float32), "lw_mean"),
        numpy_helper.from_array(np.eye(8, dtype=np.float16), "lw_matrix_f16")])
    onnx.save(helper.make_model(graph), str(head))
    try:
        learn_whitening.main(["-o", str(tmp_path / "x.onnx"), "--head-from", str(head)])
    except SystemExit as e:
        assert "its head is 8-d, efficientnet-lite0 gives 1280-d descriptors" in str(e)
    else:
        raise AssertionError("expected SystemExit")
    assert not (tmp_path / "x.onnx").exists()
