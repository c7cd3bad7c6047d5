"""HEIC/HEIF (through pillow-heif, the imgsim[heif] extra) and AVIF (where Pillow is built with it),
and how discovery tells unsupported image files apart from other files. The pictures are made here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imgsim import images
from imgsim.cli import cli
from imgsim.images import decode, discover, unsupported_reason

from .conftest import TINY_MODEL, run

needs_heif = pytest.mark.skipif(not images.HEIF_SUPPORTED,
                                reason="pillow-heif is not installed (pip install 'imgsim[heif]')")
needs_avif = pytest.mark.skipif(not images.AVIF_SUPPORTED,
                                reason="this Pillow is built without AVIF (PIL.features.check('avif') is False)")


@pytest.fixture
def picture(photo_images) -> Image.Image:
    return photo_images["coffee"].resize((160, 120))


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@needs_heif
def test_heic_is_found_decoded_and_indexed(tmp_path, picture):
    folder = tmp_path / "phone"
    folder.mkdir()
    picture.save(folder / "IMG_0001.HEIC", quality=90)  # pillow-heif's writer, registered by imgsim
    picture.transpose(Image.Transpose.ROTATE_180).save(folder / "IMG_0002.heif", quality=90)
    assert Image.open(folder / "IMG_0001.HEIC").format == "HEIF"
    assert [p.name for p in discover(folder)] == ["IMG_0001.HEIC", "IMG_0002.heif"]
    decoded = decode(folder / "IMG_0001.HEIC")
    assert (decoded.width, decoded.height, decoded.format) == (160, 120, "HEIF")
    assert mean_difference(decoded.image, picture) < 8
    _index_and_find(tmp_path, folder, "IMG_0001.HEIC")


@needs_avif
def test_avif_is_found_decoded_and_indexed(tmp_path, picture):
    folder = tmp_path / "web"
    folder.mkdir()
    picture.save(folder / "a.avif", quality=90)
    assert [p.name for p in discover(folder)] == ["a.avif"]
    decoded = decode(folder / "a.avif")
    assert (decoded.width, decoded.height, decoded.format) == (160, 120, "AVIF")
    assert mean_difference(decoded.image, picture) < 8
    _index_and_find(tmp_path, folder, "a.avif")


def _index_and_find(tmp_path, folder, name):
    index = tmp_path / "idx"
    runner = CliRunner()
    done = runner.invoke(cli, ["index", str(folder), "--index", str(index), "--model", TINY_MODEL, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert (summary["added"], summary["failed"]) == (len(list(discover(folder))), 0)
    found = runner.invoke(cli, ["search", str(folder / name), "--index", str(index), "-k", "1", "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout.splitlines()[0])["path"].endswith(name)


def test_discovery_reports_unsupported_image_files(tmp_path, monkeypatch):
    """SVG, JPEG XL, camera raw, and HEIC/AVIF where they cannot be decoded, go to `on_unsupported`
    with a reason; files that are not pictures at all do not."""
    monkeypatch.setattr(images, "IMAGE_EXTENSIONS", images.IMAGE_EXTENSIONS - {".heic", ".heif", ".hif", ".avif"})
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    for name in ("logo.svg", "scan.JXL", "IMG_1.HEIC", "sub/b.avif", "raw.cr2", "notes.txt", "Makefile",
                 ".hidden.svg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    unsupported = []
    found = list(discover(tmp_path, on_unsupported=lambda path, reason: unsupported.append((path.name, reason))))
    assert [p.name for p in found] == ["ok.png"]
    assert sorted(name for name, _ in unsupported) == ["IMG_1.HEIC", "b.avif", "logo.svg", "raw.cr2", "scan.JXL"]
    reasons = dict(unsupported)
    assert reasons["IMG_1.HEIC"] == "HEIC/HEIF needs pillow-heif: pip install 'imgsim[heif]'"
    assert reasons["logo.svg"] == "SVG is a vector format, not supported"
    assert "AVIF" in reasons["b.avif"]
    assert unsupported_reason("ok.png") is None and unsupported_reason("notes.txt") is None
    assert list(images.expand([tmp_path / "sub"], on_unsupported=lambda p, r: unsupported.append(p))) == []
    assert unsupported[-1] == tmp_path / "sub" / "b.avif"


def test_without_pillow_heif_heic_is_unsupported_and_says_why(tmp_path, picture):
    """With pillow-heif unimportable (a blocking module first on the path), .heic is not discovered,
    and decoding one names the extra to install."""
    blocker = tmp_path / "block"
    (blocker / "pillow_heif").mkdir(parents=True)
    (blocker / "pillow_heif" / "__init__.py").write_text("raise ImportError('blocked for a test')\n")
    (tmp_path / "IMG_0001.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic")  # a HEIF header
    code = ("import sys; from imgsim import images\n"
            "print(images.HEIF_SUPPORTED, '.heic' in images.IMAGE_EXTENSIONS)\n"
            "try:\n    images.decode(sys.argv[1])\nexcept images.ImageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "IMG_0001.heic")], capture_output=True,
                         text=True, env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert out.splitlines() == ["False False", "HEIC/HEIF needs pillow-heif: pip install 'imgsim[heif]'"]


def test_unsupported_files_are_counted_in_the_summary(tmp_path, photos):
    (photos / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (photos / "photo.jxl").write_bytes(b"\xff\x0a" + bytes(64))
    (photos / "notes.txt").write_text("not a picture, not counted")
    result = run("index", photos, "--index", tmp_path / "i", "--model", TINY_MODEL)
    assert result.exit_code == 0 and ", ignored 2 unsupported in " in result.stdout
    summary = json.loads(run("index", photos, "--index", tmp_path / "i", "--json").stdout)
    assert summary["unsupported"] == 2 and summary["failed"] == 0
