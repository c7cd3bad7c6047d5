"""Turned queries (imgsim/upright.py): a picture turned onto a larger canvas with plain corners is
found turned, turned back, and searched both ways. Real photos; the bundled model where it matters."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from imgsim import Filter, Index
from imgsim.images import query_arrays
from imgsim.models import BUNDLED_MODEL, Model
from imgsim.upright import find_turn, undo_turn

from .conftest import run


def _jpeg(img: Image.Image, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _small(img: Image.Image, width: int = 300) -> Image.Image:
    return img.convert("RGB").resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS)


def _turned(img: Image.Image, angle: float, fill=(0, 0, 0), quality: int = 60) -> Image.Image:
    return _jpeg(img.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=fill), quality)


def _grey_centre(img: Image.Image, share: float = 0.6) -> Image.Image:
    cw, ch = round(img.width * share), round(img.height * share)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return ImageOps.grayscale(img.crop((left, top, left + cw, top + ch))).convert("RGB")


def _edge_share(img: Image.Image, fill) -> float:
    """How much of a picture's outermost pixels are (nearly) `fill`."""
    pixels = np.asarray(img, dtype=np.int16)
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float((np.abs(edge - np.array(fill)).max(axis=1) <= 24).mean())


@pytest.mark.parametrize("angle", [4, 10, -15, 20, -7.5])
def test_a_turn_onto_a_plain_canvas_is_measured_to_half_a_degree(photo_images, angle):
    judged = 0
    for name, img in photo_images.items():
        small = _small(img)
        for fill in ((0, 0, 0), (255, 255, 255)):
            found = find_turn(_turned(small, angle, fill))
            if _edge_share(small, fill) > 0.2 and found is None:
                # much of its own edge is the fill's colour (the retina's black surround on black):
                # the turned edge cannot be told from the picture, and it is rightly left alone
                continue
            assert found is not None and abs(found - angle) <= 0.5, (name, fill, found)
            judged += 1
        # blurred or grey-cropped first (the hard families), then turned
        for altered in (small.filter(ImageFilter.GaussianBlur(3)), _grey_centre(small)):
            if _edge_share(altered, (0, 0, 0)) <= 0.2:
                found = find_turn(_turned(altered, angle))
                assert found is not None and abs(found - angle) <= 0.5, (name, found)
    assert judged >= 2 * len(photo_images) - 3


def test_turning_back_gives_the_upright_picture(photo_images):
    small = _small(photo_images["astronaut"])
    back = undo_turn(_turned(small, 15, quality=95), 15.0)
    assert abs(back.width - small.width) <= 3 and abs(back.height - small.height) <= 3
    same = np.asarray(back.resize(small.size), dtype=np.float32)
    assert np.abs(same - np.asarray(small, dtype=np.float32)).mean() < 12  # a resampled copy, not black corners
    assert np.asarray(back, dtype=np.float32)[:3, :3].mean() > 20  # no fill left in its corners


def _letterboxed(img: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (img.width, img.height + 80), (0, 0, 0))
    canvas.paste(img, (0, 40))
    return canvas


def _inset(img: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (img.width * 2, img.height * 2), (0, 0, 0))
    canvas.paste(img, (img.width // 2, img.height // 2))
    return canvas


def _clip_art() -> Image.Image:
    page = Image.new("RGB", (300, 240), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.ellipse((60, 40, 240, 200), fill=(200, 30, 30), outline=(0, 0, 0), width=4)
    draw.rectangle((120, 90, 180, 150), fill=(20, 20, 160))
    return page


def _night_sky() -> Image.Image:
    sky = Image.new("RGB", (300, 200), (0, 0, 0))
    ImageDraw.Draw(sky).ellipse((120, 60, 180, 120), fill=(240, 240, 220))  # a moon in the middle
    return sky


def test_pictures_that_are_not_turned_are_left_alone(photo_images):
    """Plain corners alone do not make a turn: the tilted edge just inside them must not be plain."""
    for name, img in photo_images.items():
        small = _small(img)
        for altered in (small, _letterboxed(small), _inset(small), small.rotate(90, expand=True)):
            assert find_turn(_jpeg(altered)) is None, name
    for plain in (_clip_art(), _night_sky(), Image.new("RGB", (300, 200), (0, 0, 0)),
                  Image.new("RGB", (12, 9), (0, 0, 0)), Image.new("L", (300, 200), 128)):
        assert find_turn(plain) is None
    # a picture turned by a right angle, or by less than a degree, has no triangles to find
    assert find_turn(_turned(_small(photo_images["coffee"]), 0.5)) is None
    assert undo_turn(_small(photo_images["coffee"]), 50.0).size == _small(photo_images["coffee"]).size


def test_query_arrays_add_the_upright_view_only_for_a_turned_picture(photo_images):
    prep = Model.load(BUNDLED_MODEL).preprocess
    small = _small(photo_images["chelsea"])
    assert query_arrays(small, prep).shape == (1, 3, prep.size, prep.size)
    assert query_arrays(_turned(small, 12), prep).shape == (2, 3, prep.size, prep.size)


@pytest.fixture
def small_photos(photos, tmp_path):
    out = tmp_path / "small"
    out.mkdir()
    for path in sorted(photos.iterdir()):
        _small(Image.open(path)).save(out / path.name, quality=90)
    return out


def test_a_turned_grey_crop_finds_its_original_upright_and_a_turned_copy_finds_itself(small_photos, tmp_path):
    """Searched upright too, a grey centre crop turned by 15 degrees finds its original first, scoring
    it higher than searched as it is; a turned picture that is itself indexed still finds itself
    first at 1.0 (the search as it is wins). The CLI, `search_many` and `search` agree."""
    turned_copy = _turned(_small(Image.open(small_photos / "chelsea.jpg")), 10, quality=90)
    turned_copy.save(small_photos / "chelsea-turned.jpg", quality=95)
    index = Index.create(tmp_path / "idx", model=BUNDLED_MODEL, root=small_photos)
    index.add(small_photos)
    queries = tmp_path / "queries"
    queries.mkdir()
    gains = []
    for path in sorted(small_photos.iterdir()):
        if "turned" in path.name:
            continue
        crop = _grey_centre(Image.open(path).convert("RGB"))
        _turned(crop, 15 if len(gains) % 2 else -15).save(queries / path.name, quality=95)
        views = index.query_vectors(queries / path.name)
        if len(views) == 1:  # not seen as turned: only where its own edge is much like the black fill
            assert _edge_share(crop, (0, 0, 0)) > 0.2, path.name
            continue
        assert views.shape == (2, index.manifest.dim)
        both, as_is = index.search(views, k=3), index.search(views[0], k=3)
        assert index.search(queries / path.name, k=3)[0].path == both[0].path
        own = {name: next((r.score for r in found if r.path == path.name), -1.0)
               for name, found in (("both", both), ("as_is", as_is))}
        gains.append(own["both"] - own["as_is"])
        if path.name != "chelsea.jpg":  # its turned copy is indexed too
            assert both[0].path == path.name, (path.name, [r.path for r in both])
    assert min(gains) >= 0 and np.median(gains) > 0.03, gains
    outcomes = {o.query: o.results for o in index.search_many([queries], k=1)}
    for name, results in outcomes.items():
        assert results[0].path == index.search(name, k=1)[0].path
    itself = index.search(small_photos / "chelsea-turned.jpg", k=1)[0]
    assert itself.path == "chelsea-turned.jpg" and itself.score == pytest.approx(1.0, abs=1e-3)
    index.close()
    shown = [json.loads(line) for line in run("search", queries / "astronaut.jpg", "--index", tmp_path / "idx",
                                              "-k", "1", "--json").stdout.splitlines()]
    assert shown[0]["path"] == "astronaut.jpg"


def test_turns_past_the_range_and_odd_pictures_are_left_alone(photo_images):
    camera = _small(photo_images["camera"] if "camera" in photo_images else next(iter(photo_images.values())))
    assert find_turn(_turned(camera, -35)) is None  # past 30 degrees: not taken for its largest fit
    turned = camera.rotate(9, Image.Resampling.BICUBIC, expand=True)
    for mode in ("P", "LA", "RGBA", "L", "I", "F", "CMYK", "1"):
        found = find_turn(turned.convert(mode))
        assert found is None or abs(found - 9) <= 0.5, mode
    for size in ((1, 1), (16, 16), (1, 5000), (5000, 3)):
        assert find_turn(Image.new("RGB", size, (0, 0, 0))) is None


def test_a_large_turned_picture_is_turned_back_reduced(photo_images):
    prep = Model.load(BUNDLED_MODEL).preprocess
    big = photo_images["coffee"].convert("RGB").resize((3000, 2000))
    arrays = query_arrays(big.rotate(-12, Image.Resampling.BICUBIC, expand=True), prep)
    assert arrays.shape == (2, 3, prep.size, prep.size)
    small = query_arrays(_small(big, 600).rotate(-12, Image.Resampling.BICUBIC, expand=True), prep)
    assert np.abs(arrays[1] - small[1]).mean() < 0.15  # the same upright picture, at any size


def test_an_empty_array_of_views_is_a_clear_error(small_photos, tmp_path):
    from imgsim import ImgsimError

    with Index.create(tmp_path / "idx") as index:
        index.add(small_photos)
        with pytest.raises(ImgsimError, match="no query vector"):
            index.search(np.empty((0, index.manifest.dim), np.float32))
        with pytest.raises(ImgsimError, match="not a 3-d array"):
            index.search(np.ones((2, 2, index.manifest.dim), np.float32))
        views = index.query_vectors(_turned(_small(Image.open(small_photos / "coffee.jpg")), 10))
        assert len(views) == 2 and index.search(views, k=1)  # the tiny test model, turned query: two views
        # a filter holds for both views (its ids read once)
        assert index.search(views, k=3, filter=Filter(formats=("png",))) == []
        assert index.search(views, k=3, filter=Filter(formats=("jpeg",))) == index.search(views, k=3)
