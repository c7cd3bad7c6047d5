"""Finding image files, decoding them safely, and turning them into model input arrays.

The pipeline for one file is: `decode` (open, check the pixel count from the header, draft-mode decode
for JPEG, apply the EXIF orientation, convert any mode to RGB) then `to_array` (resize, crop,
normalise, CHW float32). Nothing here knows about models or storage: a `Preprocess` says what to do.
"""

from __future__ import annotations

import fnmatch
import math
import os
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps, features

from . import crop_codes
from .defaults import DEFAULT_MAX_PIXELS  # noqa: F401 (shown by the CLI; defined there)
from .errors import ImageError

_HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
_AVIF_EXTENSIONS = frozenset({".avif"})


def _register_heif() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow when it is installed (``imgsim[heif]``)."""
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except Exception:  # not installed, or a build that cannot load its libheif
        return False
    return True


HEIF_SUPPORTED = _register_heif()
"""HEIC/HEIF files (what phones write) are decoded: pillow-heif is installed."""
AVIF_SUPPORTED = "avif" in features.modules and bool(features.check_module("avif"))
"""AVIF files are decoded: this Pillow was built with libavif (`PIL.features.check("avif")`)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
                             | (_HEIF_EXTENSIONS if HEIF_SUPPORTED else frozenset())
                             | (_AVIF_EXTENSIONS if AVIF_SUPPORTED else frozenset()))
"""The file name extensions (lower case) that discovery picks up: what this installation decodes."""

_UNSUPPORTED = {
    **{ext: "SVG is a vector format, not supported" for ext in (".svg", ".svgz")},
    ".jxl": "JPEG XL is not supported",
    **{ext: "HEIC/HEIF needs pillow-heif: pip install 'imgsim[heif]'" for ext in _HEIF_EXTENSIONS},
    ".avif": "AVIF needs a Pillow built with AVIF support (PIL.features.check('avif') is False here)",
    **{ext: "camera raw files are not supported" for ext in (".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                                                               ".rw2", ".raf")},
    ".psd": "Photoshop files are not supported",
}

MAX_VIEWS = 4
"""At most this many index views, and as many crop views (a manifest is untrusted: thousands of
views would make indexing build thousands of model inputs per picture)."""

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


VIEW_KINDS = ("centre", "grey", "soft")
"""The kinds of index and crop views: ``centreNN`` is the centre NN % of each side of a picture,
``greyNN`` the same in grey, and ``softNN`` (crop views only) that grey centre seen both as it is
and blurred: its vector is the two embeddings' weighted sum (`soft_views`, `crops.embed`)."""

SOFT_BLUR = 0.011
"""A soft view's blurred copy: a Gaussian blur of this share of the picture's width (as a strongly
blurred query's, README "How good is it", eighth step)."""

SOFT_WEIGHT = 0.6
"""A soft view's vector: its sharp embedding plus this much of its blurred one (each unit length),
made unit length. Alone, the blurred one found blurred crops more often and sharp ones less."""

SOFT_SCALE = 160 / 224
"""A soft view's blurred copy is embedded at this share of the model's input size (160 pixels for
224): a blurred picture has little detail for a larger input to see, and the model's work falls
by half; measured, the same crops are found as at the full size."""


def parse_view(view: str) -> tuple[int, bool]:
    """(per cent of each side, grey) of a view name such as ``centre70``, ``grey50`` or ``soft60``
    (grey too); ValueError for anything else (a manifest is untrusted)."""
    kind = next((k for k in VIEW_KINDS if isinstance(view, str) and view.startswith(k)), None)
    digits = view[len(kind):] if kind else ""
    if not (digits.isascii() and digits.isdigit() and len(digits) == 2 and 10 <= int(digits) <= 99):
        raise ValueError(f"unknown index view {view!r}: use centreNN, greyNN or softNN, e.g. grey70")
    return int(digits), kind in ("grey", "soft")


def is_soft(view: str) -> bool:
    """Whether a (parsed) view is a ``softNN`` one: also embedded blurred (`soft_views`)."""
    return view.startswith("soft")


class Views(NamedTuple):
    """What an indexed picture is embedded from: `arrays` (`to_views`), all at the model's input
    size, and `soft`, the blurred copies of its soft crop views (`soft_views`), at a smaller one."""

    arrays: np.ndarray
    soft: np.ndarray


@dataclass(frozen=True)
class Preprocess:
    """How a decoded RGB image becomes a model input.

    `resize` modes: ``crop`` scales the shorter side to `resize_to` and cuts the centre `size` x `size`
    square; ``squash`` scales the whole image to `size` x `size`, ignoring its aspect ratio.
    `mean` and `std` are per RGB channel on the 0..1 scale. `trim` first cuts plain-coloured margins
    (letterbox bars, a plain background, the page around clip-art): see `trim_plain_borders`.
    `index_views` are extra views of every *indexed* image (not of queries) whose vectors are averaged
    into its stored one: ``centreNN``, the centre NN % of each side, or ``greyNN``, the same made
    grey (see `to_views`); indexes made with ``--centre-view`` before its crop views had them.
    `crop_views` are such views kept as vectors of their own beside the image's (not in the graph),
    which a search's best candidates are also scored by (see `crops.py`), stored as `crop_code`
    says (`crop_codes.py`: float16 in indexes made before format 6, 2-bit codes since).
    """

    size: int = 224
    resize_to: int = 256
    resize: str = "crop"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    trim: bool = False
    index_views: tuple[str, ...] = ()
    crop_views: tuple[str, ...] = ()
    crop_code: str = crop_codes.FLOAT16

    def __post_init__(self):
        if self.crop_code not in crop_codes.CODES:
            raise ValueError(f"unknown crop-view code {self.crop_code!r}")
        for kind, views in (("index views", self.index_views), ("crop views", self.crop_views)):
            if len(views) > MAX_VIEWS or len(set(views)) < len(views):
                raise ValueError(f"{kind} {', '.join(map(str, views))}: at most {MAX_VIEWS}, each once")
        for view in self.index_views + self.crop_views:
            parse_view(view)
        if any(is_soft(view) for view in self.index_views):
            raise ValueError("soft views (softNN) are crop views only: an index view averaged in has no use for them")

    def to_dict(self) -> dict:
        extra = {"index_views": list(self.index_views)} if self.index_views else {}
        if self.crop_views:
            extra["crop_views"] = list(self.crop_views)
        if self.crop_code != crop_codes.FLOAT16:
            extra["crop_code"] = self.crop_code
        return {
            "size": self.size,
            "resize_to": self.resize_to,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "trim": self.trim,
            **extra,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(
            size=int(data["size"]),
            resize_to=int(data["resize_to"]),
            resize=str(data["resize"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            trim=bool(data.get("trim", False)),
            index_views=tuple(str(v) for v in data.get("index_views", ())),
            crop_views=tuple(str(v) for v in data.get("crop_views", ())),
            crop_code=data.get("crop_code", crop_codes.FLOAT16),
        )

    @property
    def decode_size(self) -> int:
        """The smallest shorter side a decoded image needs for this preprocessing."""
        return self.resize_to if self.resize == "crop" else self.size


@dataclass(frozen=True)
class Decoded:
    """An image ready for `to_array`, with what it was before any reduction."""

    image: Image.Image
    width: int
    height: int
    format: str
    taken: str | None = None
    """EXIF capture time (DateTimeOriginal, else DateTime) as ISO 8601 local time, if present and valid."""
    camera: str | None = None
    """EXIF camera make and model, if present."""


def is_hidden(name: str) -> bool:
    """Dot files and folders, which includes macOS `._*` resource forks and `.Trash`."""
    return name.startswith(".")


def has_image_extension(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def excluded(relative: str, patterns: tuple[str, ...]) -> bool:
    """True if a path (relative to the folder walked, POSIX separators) or its last part matches a glob."""
    name = relative.rpartition("/")[2]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def unsupported_reason(path: str | os.PathLike) -> str | None:
    """Why imgsim does not index this image file (SVG, JPEG XL, camera raw, and HEIC or AVIF where
    this installation cannot decode them), or None if it is not such a file: a supported image or
    no image at all. The reason is the same for every file of a kind, so reasons can be counted."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return None if ext in IMAGE_EXTENSIONS else _UNSUPPORTED.get(ext)


def discover(folder: str | os.PathLike, on_error: Callable[[Path, str], None] | None = None,
             exclude: tuple[str, ...] = (), on_unsupported: Callable[[Path, str], None] | None = None) -> Iterator[Path]:
    """Yield the image files under `folder`, recursively, in a stable sorted order.

    Hidden files and folders are skipped, and so are files and folders matching an `exclude` glob.
    No file is yielded under two names: a symbolic link (to a file or a folder) whose target lies
    inside `folder` is skipped, since the target is found under its own name; a link to something
    outside is followed and yields paths under the link's name, once (a place reached again through
    another link, or a loop, is not walked again). A folder that cannot be read is passed to
    `on_error(path, reason)`, so that nothing under it is taken as deleted. An image file imgsim
    cannot decode is passed to `on_unsupported(path, unsupported_reason(path))` (and not yielded);
    other files are ignored.
    """
    root = Path(folder)
    inside = os.path.join(os.path.realpath(folder), "")
    seen: set[tuple[int, int]] = set()
    linked_files: set[str] = set()  # the real paths of files yielded through links

    def alias(entry: os.DirEntry, through_link: bool) -> bool:
        """A link into `folder`, or a second way to a file already yielded through a link."""
        is_link = entry.is_symlink()
        if not (is_link or through_link):
            return False
        target = os.path.realpath(entry.path)
        if is_link and os.path.exists(target) and os.path.join(target, "").startswith(inside):
            return True
        if os.path.isdir(target):  # a folder reached twice is caught by `seen`
            return False
        if target in linked_files:
            return True
        linked_files.add(target)
        return False

    def walk(directory: Path, through_link: bool = False) -> Iterator[Path]:
        try:
            st = directory.stat()
        except OSError as e:
            if on_error:
                on_error(directory, e.strerror or str(e))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            if on_error:
                on_error(directory, e.strerror or str(e))
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            path = Path(entry.path)
            if exclude and excluded(path.relative_to(root).as_posix(), exclude):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            try:
                if alias(entry, through_link):
                    continue
            except OSError as e:  # a link that cannot be followed (into /proc, say): reported, passed over
                if on_error:
                    on_error(path, e.strerror or str(e))
                continue
            if is_dir:
                yield from walk(path, through_link or entry.is_symlink())
            elif has_image_extension(entry.name):
                yield path
            elif on_unsupported and (reason := unsupported_reason(entry.name)):
                on_unsupported(path, reason)

    yield from walk(root)


def expand(sources: Iterable[str | os.PathLike], on_error: Callable[[Path, str], None] | None = None,
           exclude: tuple[str, ...] = (), on_unsupported: Callable[[Path, str], None] | None = None) -> Iterator[Path]:
    """Yield image files from a mix of files and folders; a folder is walked with `discover`.
    A file named explicitly is always yielded (decoding it says what is wrong with it), unless excluded."""
    for source in sources:
        path = Path(source)
        if path.is_dir():
            yield from discover(path, on_error, exclude, on_unsupported)
        elif not (exclude and excluded(path.name, exclude)):
            yield path


def decode(path: str | os.PathLike, min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Open and decode an image file as RGB, upright, reduced cheaply where `min_side` allows.

    JPEGs are decoded in draft mode at the smallest DCT scale that keeps the shorter side at least
    `min_side` pixels, which is many times faster than a full decode of a large photo.
    Raises `ImageError` with a short reason for anything that is not a readable image.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ImageError(e.strerror or str(e)) from None
    if not stat.S_ISREG(mode):
        raise ImageError("not a regular file")
    return decode_stream(path, min_side, max_pixels)


def decode_stream(source: str | BinaryIO, min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """`decode` for a path already checked, or for a binary file object such as an upload held in
    memory (`io.BytesIO`). The format is found from the content, never from a name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"{width}x{height} pixels is over the limit of {max_pixels:,}")
                fmt = img.format or ""
                if min_side and fmt == "JPEG":
                    img.draft("RGB", _draft_request(width, height, min_side))
                img.load()
                taken, camera = exif_facts(img)
                rgb = to_rgb(ImageOps.exif_transpose(img))
                if rgb.size != img.size and rgb.size == img.size[::-1]:  # turned a quarter: as shown
                    width, height = height, width
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own cap, checked before ours can be
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise ImageError(f"pixel count is over the limit of {limit:,} (a decompression bomb?)") from None
    except Exception as e:  # Pillow raises many types for bad data: all mean "not a readable image".
        raise ImageError(_reason(e, source if isinstance(source, (str, os.PathLike)) else "")) from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError("image has no pixels")
    return Decoded(rgb, width, height, fmt, taken, camera)


_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME, _MAKE, _MODEL = 0x8769, 0x9003, 0x0132, 0x010F, 0x0110


def exif_facts(img: Image.Image) -> tuple[str | None, str | None]:
    """(capture time, camera) from an image's EXIF: untrusted text, so only well-formed values are kept."""
    try:
        exif = img.getexif()
        stamp = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        make, model = (_exif_text(exif.get(tag)) for tag in (_MAKE, _MODEL))
    except Exception:  # a damaged EXIF block is not a reason to refuse the picture
        return None, None
    camera = model if not make or (model and model.lower().startswith(make.lower())) else " ".join(filter(None, (make, model)))
    return _exif_time(stamp), camera or None


def _exif_text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    text = "".join(ch for ch in value if ch.isprintable()).strip()
    return text[:64] or None


def _exif_time(value) -> str | None:
    """EXIF writes 'YYYY:MM:DD HH:MM:SS'; anything else (zeros, garbage) is no time at all."""
    text = _exif_text(value)
    if not text or len(text) < 19:
        return None
    try:
        parsed = time.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    if parsed.tm_year < 1900:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", parsed)


def _draft_request(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The (w, h) to ask `draft` for so that the shorter side stays at least `min_side`."""
    scale = min_side / max(1, min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reason(e: Exception, path: str | os.PathLike) -> str:
    text = str(e) or type(e).__name__
    if "cannot identify image file" in text:
        try:
            if os.path.getsize(path) == 0:
                return "an empty file (0 bytes)"
        except (OSError, TypeError, ValueError):  # gone meanwhile, or not a path (an upload)
            pass
        return unsupported_reason(path) or "not an image (unrecognised format)"
    return text.splitlines()[0]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency onto white (onto black where what shows is
    itself nearly all white: see `backdrop`), 16-bit and float scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L").convert("RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")  # Pillow has no La -> RGBA
        background = Image.new("RGBA", rgba.size, backdrop(rgba))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


LIGHT_SHARE = 0.9
"""A transparent picture goes onto black, not white, when at least this share of what shows (by
opacity) is near-white (every channel >= 232): a white logo or icon made for dark pages would vanish
on white, and every such picture would embed as the same blank page (and group as duplicates at
1.000). Only those change: on white they had no picture to find."""


def backdrop(rgba: Image.Image) -> tuple[int, int, int, int]:
    """The colour to flatten a transparent RGBA picture onto: white, or black (see `LIGHT_SHARE`)."""
    pixels = np.asarray(rgba)
    step = max(1, max(pixels.shape[:2]) // 512)  # a sample is enough to tell; large pictures stay cheap
    pixels = pixels[::step, ::step]
    alpha = pixels[..., 3].astype(np.float64)
    shown = float(alpha.sum())
    if shown == 0:
        return (255, 255, 255, 255)
    light = float(alpha[pixels[..., :3].min(axis=2) >= 232].sum())
    return (0, 0, 0, 255) if light >= LIGHT_SHARE * shown else (255, 255, 255, 255)


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of more than 8 bits to 8: 16-bit modes by 257; 32-bit int and float by their range."""
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and 255 < top <= 65535):
        values = values / 257.0
    elif mode == "F" and top <= 1.0:
        values = values * 255.0
    elif top > 255:
        values = values * (255.0 / top)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_array(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """Resize, crop and normalise an RGB image into a (3, size, size) float32 array."""
    resample = _RESAMPLE[prep.interpolation]
    if prep.trim:
        img = trim_plain_borders(img)
    if prep.resize == "squash":
        img = img.resize((prep.size, prep.size), resample)
    elif prep.resize == "crop":
        img = _resize_shorter(img, prep.resize_to, resample)
        left = (img.width - prep.size) // 2
        top = (img.height - prep.size) // 2
        img = img.crop((left, top, left + prep.size, top + prep.size))
    else:
        raise ValueError(f"unknown resize mode {prep.resize!r}")
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def to_views(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """The (V, 3, size, size) arrays an indexed image is embedded from: the whole image (`to_array`),
    then each of `prep.index_views`, then each of `prep.crop_views` (``centreNN``: the centre NN %
    of each side, cut before the borders are trimmed, as a tight crop of the picture would be;
    ``greyNN`` and ``softNN``: that centre in grey, as RGB; see `soft_views` for the rest of a soft one)."""
    return picture_views(img, prep).arrays


def soft_views(img: Image.Image, prep: Preprocess, side: int | None = None) -> np.ndarray:
    """(S, 3, side, side): each soft crop view's grey centre blurred by `SOFT_BLUR` of the picture's
    width, at `soft_side` (or `side`: a model fixed at its own size); none (S = 0) without soft views."""
    return picture_views(img, prep, side).soft


def picture_views(img: Image.Image, prep: Preprocess, soft: int | None = None) -> Views:
    """`to_views` and `soft_views` (at side `soft`, if given) of a picture, each view's centre cut once."""
    side = soft or soft_side(prep)  # (and `resize_to` in proportion, so that "crop" keeps the same share)
    small = replace(prep, size=side, resize_to=max(side, round(prep.resize_to * side / prep.size)))
    blur = ImageFilter.GaussianBlur(SOFT_BLUR * img.width)
    arrays, blurred = [to_array(img, prep)], []
    for view in prep.index_views + prep.crop_views:
        centre = _centre(img, view)
        arrays.append(to_array(centre.convert("RGB"), prep))
        if is_soft(view):  # blurred in grey, one channel: a third of the work of blurring three equal ones
            blurred.append(to_array(centre.filter(blur).convert("RGB"), small))
    return Views(np.stack(arrays), np.stack(blurred) if blurred else np.empty((0, 3, side, side), np.float32))


def soft_side(prep: Preprocess) -> int:
    """The input side a soft view's blurred copy is embedded at: `SOFT_SCALE` of the model's."""
    return max(16, round(prep.size * SOFT_SCALE))


def _centre(img: Image.Image, view: str) -> Image.Image:
    """A view's centre of a picture (the centre NN % of each side), in grey (mode L) for a grey or soft view."""
    percent, grey = parse_view(view)
    share = percent / 100
    cw, ch = max(1, round(img.width * share)), max(1, round(img.height * share))
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    crop = img.crop((left, top, left + cw, top + ch))
    return crop.convert("L") if grey else crop


FIELD_SHARE = 0.5
"""A margin of a colour other than white or black is cut only where less than this share of what
would be kept is that colour too: otherwise the colour is the picture's own (a wallpaper's plain
sky with a moon at one edge), and cutting it made the same wallpaper at another size or as a JPEG
a different picture (its 480-pixel JPEG was cut to 11 % of its width, its 1920-pixel PNG to 97 %)."""


def trim_plain_borders(img: Image.Image, tol: int = 12, share: float = 0.97, rounds: int = 3) -> Image.Image:
    """Cut off margins of one plain colour from each side: letterbox bars, the plain background a
    picture was pasted onto, the white page around clip-art.

    A line (row or column) is plain when `share` of its pixels are within `tol` of the median
    colour of that side's outermost line; plain lines are cut from the outside in, per side, for
    up to `rounds` rounds (a black bar, then the white page inside it). Found on a copy reduced to
    at most 160 pixels, so it costs about a millisecond. Nothing is cut from an image that is
    plain all over, or to less than 1/8 of a side, and a coloured margin only if the colour does
    not fill much of the rest (`FIELD_SHARE`).
    """
    factor = max(1, math.ceil(max(img.size) / 160))
    small = np.asarray(img.reduce(factor) if factor > 1 else img, dtype=np.int16)
    top, bottom, left, right = 0, small.shape[0], 0, small.shape[1]

    def plain_run(lines: np.ndarray) -> tuple[int, np.ndarray]:
        """How many lines, from the first, are plain in the first one's colour; and that colour."""
        background = np.median(lines[0], axis=0).astype(np.int16)
        done, step = 0, 4
        while done < len(lines):
            chunk = lines[done:done + step]
            plain = (np.abs(chunk - background).max(axis=-1) <= tol).mean(axis=1) >= share
            if not plain.all():
                return done + int(np.argmin(plain)), background
            done, step = done + len(chunk), step * 2
        return done, background

    for _ in range(rounds):
        view = small[top:bottom, left:right]
        if min(view.shape[:2]) < 8:
            break
        sides = [plain_run(view), plain_run(view[::-1]), plain_run(view.transpose(1, 0, 2)),
                 plain_run(view.transpose(1, 0, 2)[::-1])]
        h, w = view.shape[:2]
        kept = view[sides[0][0]:h - sides[1][0], sides[2][0]:w - sides[3][0]]
        for n, (cut, background) in enumerate(sides):
            page_or_bar = bool(np.all(background >= 255 - 2 * tol) or np.all(background <= 2 * tol))
            if cut and not page_or_bar and kept.size and \
                    (np.abs(kept - background).max(axis=-1) <= tol).mean() >= FIELD_SHARE:
                sides[n] = (0, background)
        cut_top, cut_bottom, cut_left, cut_right = (cut for cut, _ in sides)
        if not (cut_top or cut_bottom or cut_left or cut_right):
            break
        if cut_top + cut_bottom >= h * 7 / 8 or cut_left + cut_right >= w * 7 / 8:
            break
        top, bottom, left, right = top + cut_top, bottom - cut_bottom, left + cut_left, right - cut_right
    if (top, left) == (0, 0) and (bottom, right) == small.shape[:2]:
        return img
    scale_y, scale_x = img.height / small.shape[0], img.width / small.shape[1]
    box = (round(left * scale_x), round(top * scale_y), round(right * scale_x), round(bottom * scale_y))
    return img.crop(box)


def _resize_shorter(img: Image.Image, target: int, resample: Image.Resampling) -> Image.Image:
    w, h = img.size
    scale = target / min(w, h)
    size = (max(target, round(w * scale)), max(target, round(h * scale)))
    # reducing_gap makes Pillow shrink in integer steps first: much faster, visually identical.
    return img.resize(size, resample, reducing_gap=3.0)


def load_array(path: str | os.PathLike, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, Decoded]:
    """`decode` then `to_array`: one picture as the model sees it."""
    decoded = decode(path, prep.decode_size, max_pixels)
    return to_array(decoded.image, prep), decoded


def query_arrays(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """The (N, 3, size, size) arrays a search compares for an RGB query picture: the picture
    itself, then, where it looks turned onto a plain canvas (`upright.find_turn`), the picture
    turned back upright. The index holds each picture as it is: see `Index.search`."""
    from .upright import find_turn, undo_turn

    arrays = [to_array(img, prep)]
    angle = find_turn(img)
    if angle is not None:
        # turned back at no more than twice the size the model needs (a large PNG turned in full took seconds)
        factor = min(img.size) // (2 * max(prep.resize_to, prep.size))
        arrays.append(to_array(undo_turn(img.reduce(factor) if factor > 1 else img, angle), prep))
    return np.stack(arrays)


def load_query(path: str | os.PathLike, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, Decoded]:
    """`decode` then `query_arrays`: what searching does with a query file (decoded at the size
    indexing decodes it at, so that a copy of an indexed file is the same picture to the model)."""
    decoded = decode(path, index_decode_size(prep), max_pixels)
    return query_arrays(decoded.image, prep), decoded


def load_views(path: str | os.PathLike, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
               soft: int | None = None) -> tuple[Views, Decoded]:
    """`decode` then `picture_views` (its blurred soft views at side `soft`, if given): what indexing
    does with each file."""
    decoded = decode(path, index_decode_size(prep), max_pixels)
    return picture_views(decoded.image, prep, soft), decoded


def index_decode_size(prep: Preprocess) -> int:
    """The shorter side indexing decodes a picture at (a query too, `load_query`, so that a copy of an
    indexed JPEG is decoded to the same pixels): enough that the smallest averaged centre view, and
    the largest crop view, still have `decode_size` on theirs. Smaller crop views are enlarged a
    little instead: asking for their full size made a 12-megapixel JPEG decode at a quarter of its
    size instead of an eighth, four times the pixels and their memory, for a few per cent of the
    indexing speed here (scripts/bench_index.py: the model runs set the pace)."""
    shares = [parse_view(v)[0] for v in prep.index_views] + ([max(parse_view(v)[0] for v in prep.crop_views)]
                                                             if prep.crop_views else [])
    return math.ceil(prep.decode_size * 100 / min(shares, default=100))
