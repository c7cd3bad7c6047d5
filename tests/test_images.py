"""Finding and decoding image files the way real folders need."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsim.errors import ImageError
from imgsim.images import Preprocess, decode, discover, to_array, to_views, trim_plain_borders

from .conftest import exif_rotated


def _save(path: Path, img: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kwargs)
    return path


def test_discover_walks_recursively_case_insensitive_and_skips_hidden(tmp_path):
    red = Image.new("RGB", (8, 8), "red")
    wanted = [
        _save(tmp_path / "a.JPG", red, "JPEG"),
        _save(tmp_path / "b.jpeg", red, "JPEG"),
        _save(tmp_path / "sub" / "c.png", red),
        _save(tmp_path / "sub" / "deeper" / "d.WebP", red, "WEBP"),
        _save(tmp_path / "e.bmp", red),
        _save(tmp_path / "f.gif", red),
        _save(tmp_path / "g.tif", red),
        _save(tmp_path / "h.TIFF", red, "TIFF"),
    ]
    _save(tmp_path / ".hidden.jpg", red, "JPEG")
    _save(tmp_path / "._a.JPG", red, "JPEG")  # macOS resource fork
    _save(tmp_path / ".thumbnails" / "x.jpg", red, "JPEG")
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "raw.cr2").write_bytes(b"raw")
    found = list(discover(tmp_path))
    assert sorted(found) == sorted(wanted)


def test_discover_follows_symlinks_once_and_survives_loops(tmp_path):
    photos = tmp_path / "photos"
    _save(photos / "a.png", Image.new("RGB", (8, 8)))
    _save(tmp_path / "outside" / "b.png", Image.new("RGB", (8, 8)))
    os.symlink(photos, photos / "loop")  # a folder that contains itself
    os.symlink(tmp_path / "photos" / "a.png", photos / "link.png")  # a second name inside: skipped
    os.symlink(tmp_path / "outside", photos / "out")
    os.symlink(tmp_path / "outside" / "b.png", photos / "z-link.png")  # a second way to out/b.png
    os.symlink(photos / "out", tmp_path / "outside" / "back")  # a loop through the outside
    found = list(discover(photos))
    assert [p.relative_to(photos).as_posix() for p in found] == ["a.png", "out/b.png"]


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (300, 200), "white")
    upright.paste(Image.new("RGB", (100, 200), "red"), (0, 0))  # red on the left
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated(upright))
    with Image.open(path) as raw:
        assert raw.size == (200, 300)  # stored sideways
    decoded = decode(path)
    assert decoded.image.size == (300, 200)
    assert (decoded.width, decoded.height) == (300, 200)  # stored as shown: --min-width means what one sees
    pixels = np.asarray(decoded.image)
    assert pixels[100, 20, 0] > 200 and pixels[100, 20, 1] < 80  # red is back on the left
    assert pixels[100, 280].min() > 200


@pytest.mark.parametrize("mode, maker, expected", [
    ("L", lambda: Image.new("L", (4, 4), 128), (128, 128, 128)),
    ("1", lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent: white
    ("LA", lambda: Image.new("LA", (4, 4), (0, 255)), (0, 0, 0)),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
    ("I", lambda: Image.fromarray(np.full((4, 4), 32896, np.int32)), (128, 128, 128)),
    ("F", lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),
])
def test_every_mode_becomes_rgb(tmp_path, mode, maker, expected):
    img = maker()
    assert img.mode == mode
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    path = _save(tmp_path / f"x.{fmt.lower()}", img, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    decoded = decode(path)
    assert decoded.image.mode == "RGB"
    assert np.allclose(np.asarray(decoded.image)[1, 1], expected, atol=3)


def test_premultiplied_modes_become_rgb_too():
    """Pillow's premultiplied-alpha modes (a PIL image handed to `Index.search`): La has no direct
    conversion to RGBA."""
    from imgsim.images import to_rgb

    for img in (Image.new("LA", (4, 4), (200, 255)).convert("La"),
                Image.new("RGBA", (4, 4), (200, 0, 0, 255)).convert("RGBa")):
        rgb = to_rgb(img)
        assert rgb.mode == "RGB" and np.asarray(rgb)[1, 1].max() >= 195


def test_palette_transparency_goes_onto_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    path = _save(tmp_path / "p.png", img, transparency=0)
    assert np.asarray(decode(path).image)[0, 0].tolist() == [255, 255, 255]


def _shape_on_transparency(kind: str, colour: tuple[int, int, int], size: int = 96) -> Image.Image:
    from PIL import ImageDraw

    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    if kind == "disc":
        draw.ellipse((16, 16, size - 16, size - 16), fill=(*colour, 255))
    else:  # a cross of two bars
        draw.rectangle((size // 2 - 8, 8, size // 2 + 8, size - 8), fill=(*colour, 255))
        draw.rectangle((8, size // 2 - 8, size - 8, size // 2 + 8), fill=(*colour, 255))
    return img


def test_white_artwork_on_transparency_goes_onto_black_and_the_rest_onto_white(tmp_path):
    """A white logo made for dark pages would vanish on white (every such file one blank page):
    what shows being nearly all white, it goes onto black; coloured artwork stays on white."""
    white = decode(_save(tmp_path / "white.png", _shape_on_transparency("disc", (255, 255, 255))))
    pixels = np.asarray(white.image)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[48, 48].tolist() == [255, 255, 255]
    red = np.asarray(decode(_save(tmp_path / "red.png", _shape_on_transparency("disc", (200, 30, 30)))).image)
    assert red[0, 0].tolist() == [255, 255, 255] and red[48, 48].tolist() == [200, 30, 30]
    palette = _shape_on_transparency("cross", (250, 250, 250)).convert("RGB").quantize(4)
    transparent = palette.getpixel((0, 0))
    palette_path = _save(tmp_path / "p.png", palette, transparency=transparent)
    assert np.asarray(decode(palette_path).image)[0, 0].tolist() == [0, 0, 0]
    faint = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # nothing shows at all: white, as before
    assert np.asarray(decode(_save(tmp_path / "none.png", faint)).image)[0, 0].tolist() == [255, 255, 255]


def test_different_white_logos_are_different_pictures(tmp_path):
    """Through the bundled model: on white, a white disc and a white cross were both a blank page
    (similarity 1.000, a duplicate pair); on black they are what they are."""
    from imgsim import Index

    folder = tmp_path / "logos"
    folder.mkdir()
    for kind in ("disc", "cross"):
        _save(folder / f"{kind}.png", _shape_on_transparency(kind, (255, 255, 255), 256))
    _save(folder / "disc-small.png", _shape_on_transparency("disc", (255, 255, 255), 128))
    with Index.create(tmp_path / "idx", model="efficientnet-lite0", root=folder) as index:
        index.add(folder)
        results = index.search(folder / "disc.png", k=3, expand=False)
    by_name = {Path(r.path).name: r.score for r in results}
    assert results[0].path.endswith("disc.png") and results[0].score > 0.99
    assert by_name["disc-small.png"] > by_name["cross.png"] and by_name["cross.png"] < 0.95


def test_large_jpeg_is_decoded_in_draft_mode_but_not_below_what_the_model_needs(tmp_path):
    big = Image.new("RGB", (4000, 3000), "blue")
    path = _save(tmp_path / "big.jpg", big, "JPEG")
    decoded = decode(path, min_side=256)
    assert (decoded.width, decoded.height) == (4000, 3000)  # the original size is what is reported
    assert min(decoded.image.size) >= 256
    assert decoded.image.size[0] <= 1000  # decoded at 1/4 scale or less


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    pixel = np.asarray(decode(path).image)[4, 4]
    assert pixel[0] > 200 and pixel[1] < 60


@pytest.mark.parametrize("content, reason", [
    (b"", "an empty file"),
    (b"hello, this is text", "not an image"),
])
def test_unreadable_files_raise_image_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        decode(path)


def test_truncated_jpeg_is_an_error(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((400, 400), 60).convert("RGB").save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError):
        decode(path)


def test_pixel_limit_refuses_bombs_before_decoding(tmp_path):
    path = _save(tmp_path / "wide.png", Image.new("L", (5000, 5000)))
    with pytest.raises(ImageError, match="over the limit"):
        decode(path, max_pixels=1_000_000)


def test_to_array_shapes_and_normalises():
    prep = Preprocess(size=224, resize_to=256, resize="crop", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    array = to_array(Image.new("RGB", (640, 480), (255, 0, 0)), prep)
    assert array.shape == (3, 224, 224) and array.dtype == np.float32
    assert np.allclose(array[0], 1.0) and np.allclose(array[1], -1.0)
    squash = to_array(Image.new("RGB", (1000, 10), "white"), Preprocess(size=32, resize="squash"))
    assert squash.shape == (3, 32, 32)


def test_index_views_add_the_centre_of_the_picture_and_are_recorded():
    prep = Preprocess(size=32, resize_to=32, resize="squash", index_views=("centre60",))
    img = Image.new("RGB", (100, 50), "black")
    img.paste((255, 255, 255), (20, 10, 80, 40))  # the centre 60 % of each side is white
    views = to_views(img, prep)
    assert views.shape == (2, 3, 32, 32)
    assert np.array_equal(views[0], to_array(img, prep))
    assert np.allclose(views[1], to_array(Image.new("RGB", (60, 30), "white"), prep))
    assert Preprocess.from_dict(prep.to_dict()) == prep
    old = prep.to_dict()
    del old["index_views"]  # an index made before index views: its pipeline has none
    assert Preprocess.from_dict(old).index_views == ()
    assert "index_views" not in Preprocess(size=32).to_dict()
    with pytest.raises(ValueError):
        Preprocess(index_views=("mirror",))


def _photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A busy picture (no plain lines anywhere)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image, width: int) -> Image.Image:
    small = img.resize((width, round(img.height * width / img.width)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.mark.parametrize("canvas", [(0, 0, 0), (255, 255, 255), (40, 120, 90)])
def test_plain_margins_are_trimmed_off_a_picture_put_on_a_canvas(canvas):
    """Letterbox bars, the white page around a drawing, and a coloured canvas a photo was pasted
    on at one corner: cut off, leaving (about) the picture itself."""
    out = Image.new("RGB", (640, 480), canvas)
    out.paste(_photo_like((240, 200)), (380, 260))
    assert trim_plain_borders(out).size == pytest.approx((240, 200), abs=12)
    bars = Image.new("RGB", (640, 480), canvas)
    bars.paste(_photo_like((640, 300)), (0, 90))
    assert trim_plain_borders(bars).size == pytest.approx((640, 300), abs=12)


def test_a_plain_coloured_field_that_is_the_picture_is_not_cut():
    """A wallpaper that is mostly one dark colour with a moon and a planet towards one side (as
    Debian's moonlight grub background): the field goes on into what a cut would keep, so it is the
    picture, not a margin, and nothing is cut at any size. (That wallpaper was cut to 11 % of its
    width as a 480-pixel JPEG and to 97 % as its 1920-pixel PNG: to the model two different
    pictures, the original found 7th.) Black bars and white pages are cut regardless."""
    field = np.full((1080, 1920, 3), (35, 52, 62), np.uint8)
    yy, xx = np.mgrid[:1080, :1920]
    for y, x in ((300, 1300), (800, 1750)):  # a moon and a planet, far apart
        field[(yy - y) ** 2 + (xx - x) ** 2 < 70 ** 2] = (220, 214, 170)
    wallpaper = Image.fromarray(field)
    for img in (wallpaper, _jpeg(wallpaper, 480), _jpeg(wallpaper, 800)):
        assert trim_plain_borders(img).size == img.size
    for page in ((0, 0, 0), (255, 255, 255)):  # part of it on a black or white page: the page goes
        paged = Image.new("RGB", (1920, 1080), page)
        paged.paste(wallpaper.crop((1200, 200, 1850, 900)), (1200, 200))
        assert trim_plain_borders(paged).size == pytest.approx((650, 700), abs=24)
