"""Shared fixtures: real photos from scikit-image, transformed copies of them, and the tiny model
(tests/tiny_model.py) registered in the catalogue for every test."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from imgsim import models

from .tiny_model import TINY_MODEL, tiny_spec, write_tiny_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sample_photos import PHOTOS, photo  # noqa: E402  (skimage's photos, one place for tests and the demo)


@pytest.fixture(scope="session", autouse=True)
def checked_cache(tmp_path_factory):
    """Records of checked FAISS files (imgsim/checked.py) go to a temporary folder, not ~/.cache."""
    folder = tmp_path_factory.mktemp("checked-cache")
    previous = os.environ.get("IMGSIM_CACHE")
    os.environ["IMGSIM_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("IMGSIM_CACHE", None)
    else:
        os.environ["IMGSIM_CACHE"] = previous


@pytest.fixture(scope="session")
def photo_images() -> dict[str, Image.Image]:
    found = {name: img for name in PHOTOS if (img := photo(name)) is not None}
    assert len(found) >= 10, "scikit-image should ship at least 10 of these photos"
    return found


@pytest.fixture(scope="session")
def photos_master(tmp_path_factory, photo_images) -> Path:
    folder = tmp_path_factory.mktemp("photos-master")
    for name, img in photo_images.items():
        img.save(folder / f"{name}.jpg", quality=95)
    return folder


@pytest.fixture
def photos(tmp_path, photos_master) -> Path:
    """A fresh, writable copy of the photo folder (JPEG, quality 95)."""
    folder = tmp_path / "photos"
    shutil.copytree(photos_master, folder)
    return folder


def exif_rotated(img: Image.Image) -> bytes:
    """The picture stored rotated by 90 degrees, with an EXIF tag that says how to turn it upright."""
    stored = img.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def transformed_copies(img: Image.Image) -> dict[str, bytes]:
    """What people do to photos: each variant as encoded file bytes (JPEG)."""

    def jpeg(image: Image.Image, quality: int = 90) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return out.getvalue()

    w, h = img.size
    cw, ch = int(w * 0.8), int(h * 0.8)
    left, top = (w - cw) // 2, (h - ch) // 2
    return {
        "resized": jpeg(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "jpeg40": jpeg(img, quality=40),
        "crop80": jpeg(img.crop((left, top, left + cw, top + ch))),
        "brighter": jpeg(ImageEnhance.Brightness(img).enhance(1.4)),
        "exif-rotated": exif_rotated(img),
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_tiny_onnx(folder / "tiny-test.onnx")
    return folder


def use_tiny_model(monkeypatch: pytest.MonkeyPatch, model_dir: Path):
    """Register the tiny model (and nothing of the user's IMGSIM_* settings) through `monkeypatch`."""
    monkeypatch.setenv(models.MODELS_ENV, str(model_dir))
    monkeypatch.delenv("IMGSIM_INDEX", raising=False)
    spec = tiny_spec()
    monkeypatch.setitem(models.CATALOGUE, TINY_MODEL, spec)
    return spec


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch, tiny_model_dir):
    """Make the tiny model available to every test, and keep IMGSIM_* settings out of the tests."""
    return use_tiny_model(monkeypatch, tiny_model_dir)


@contextmanager
def read_only_folder(folder: Path):
    """Make `folder` unwritable even for root (chattr +i), as a shipped dataset on read-only media is."""
    os.chmod(folder, 0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root ignores permissions: use the immutable attribute instead
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            os.chmod(folder, 0o755)
            pytest.skip("cannot make a folder read-only here")
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        os.chmod(folder, 0o755)


def run(*args, env=None):
    """Run the imgsim CLI in-process; `result.stdout`, `.stderr` and `.exit_code` as a user sees them."""
    from click.testing import CliRunner

    from imgsim.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def build_index(path: Path, *sources, **options) -> Path:
    """Create an index at `path` with the tiny model, add `sources`, close it; return `path`."""
    from imgsim import Index

    with Index.create(path, model=TINY_MODEL, **options) as index:
        index.add(list(sources))
    return path
