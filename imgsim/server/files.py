"""Serving indexed images and their thumbnails, by id only.

A request names an id; the index says which file that is. No part of a request ever becomes a
path. The file is opened once, checked to be an image by decoding its header from that open file
(an index whose rows point at `/etc/passwd` serves nothing), and streamed from the same descriptor.
Thumbnails are small JPEGs made on first request and kept in memory (never on disk), keyed by the
file's identity, so that a changed file gets a new thumbnail and a new ETag.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from .. import images as imgs
from ..errors import ImageError
from .errors import ApiError

THUMB_SIZE = 320
"""The longer side of a thumbnail, in pixels: sharp in a phone's two-column grid."""

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
               "BMP": "image/bmp", "TIFF": "image/tiff", "MPO": "image/jpeg"}


@dataclass(frozen=True)
class Opened:
    """An indexed file, open, known to be an image of `media_type`."""

    file: io.BufferedReader
    size: int
    etag: str
    media_type: str


def etag_for(image_id: int, st: os.stat_result, kind: str) -> str:
    digest = hashlib.sha256(f"{kind}:{image_id}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f'"{digest.hexdigest()[:32]}"'


def open_indexed(path: os.PathLike, image_id: int) -> Opened:
    """Open the file an index row names, or raise a 404 `ApiError` if it is gone, not a regular
    file, or not an image."""
    try:
        file = open(path, "rb")
    except OSError:
        raise ApiError(404, f"image {image_id} is in the index but its file cannot be read now") from None
    try:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(404, f"image {image_id} is not a regular file now")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(file) as img:  # reads the header only
                    fmt = img.format or ""
        except Exception:
            raise ApiError(404, f"image {image_id}'s file is not an image now") from None
        file.seek(0)
        return Opened(file, st.st_size, etag_for(image_id, st, "image"), MEDIA_TYPES.get(fmt, "application/octet-stream"))
    except BaseException:
        file.close()
        raise


def stream(file: io.BufferedReader, size: int, chunk: int = 256 * 1024):
    """The first `size` bytes of an open file (its size when opened: the Content-Length sent)."""
    try:
        left = size
        while left > 0 and (data := file.read(min(chunk, left))):
            left -= len(data)
            yield data
    finally:
        file.close()


class Thumbnails:
    """Thumbnails made on demand, the most recently used kept up to `max_bytes` in memory."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_pixels: int = imgs.DEFAULT_MAX_PIXELS):
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def identity(self, path: os.PathLike, image_id: int) -> str:
        """The ETag of the file's thumbnail as it is now (404 if it is gone)."""
        try:
            st = os.stat(path)
        except OSError:
            raise ApiError(404, f"image {image_id} is in the index but its file cannot be read now") from None
        return etag_for(image_id, st, f"thumb{THUMB_SIZE}")

    def get(self, path: os.PathLike, image_id: int, etag: str) -> bytes:
        with self._lock:
            data = self._cache.get(etag)
            if data is not None:
                self._cache.move_to_end(etag)
                return data
        data = self._make(path, image_id)
        with self._lock:
            if etag not in self._cache:
                self._cache[etag] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= len(dropped)
        return data

    def _make(self, path: os.PathLike, image_id: int) -> bytes:
        try:
            decoded = imgs.decode(path, min_side=THUMB_SIZE, max_pixels=self.max_pixels)
        except ImageError as e:
            raise ApiError(404, f"image {image_id}'s file cannot be decoded now: {e}") from None
        img = decoded.image
        img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=82, optimize=True)
        return out.getvalue()
