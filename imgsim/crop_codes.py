"""How crop-view vectors are stored: as float16 (indexes made before format 6) or as 2-bit codes.

A crop view only re-scores a search's best few candidates against the query (`crops.py`), which
measurably needs far less than float16: each value of the (unit-length) vector, times sqrt(dim),
is replaced by the nearest of four levels (`LEVELS`), packed four to a byte. A 1280-d view takes
320 bytes instead of 2,560, and the eval harness finds the same pictures with either (README "How
good is it", seventh step). Any byte is a valid code, so a
damaged code can only mis-score its own image, never harm the process; `decode` checks lengths.
The codes need no training: every view is coded alone, the same way whenever it is made.
"""

from __future__ import annotations

import numpy as np

FLOAT16 = "f16"
"""Float16 values, little-endian, as the images' own vectors (crop views of formats 4 and 5)."""

TWO_BIT = "2bit"
"""Four levels a value, four values a byte (format 6 on: every new index with crop views)."""

CODES = (FLOAT16, TWO_BIT)

LEVELS = np.array([-2.335, -0.4625, 0.4625, 2.335], np.float32)
"""The four levels of a value times sqrt(dim): Lloyd's optimum for the values of
efficientnet-lite0-lw's grey centre views of 3,000 clip-art pictures (openclipart, none of them
in the evaluation), heavier-tailed than a Gaussian's (kurtosis 8.4): a coded view's cosine with
its vector is 0.90 on average on the evaluation's pictures, against 0.88 with a Gaussian's levels."""

THRESHOLDS = np.array([-1.4, 0.0, 1.4], np.float32)
"""Where one level gives way to the next (halfway between them)."""

_BYTE_LEVELS = LEVELS[(np.arange(256)[:, None] >> (2 * np.arange(4))) & 3]
"""(256, 4): the four levels each byte's value codes, lowest bits first."""


def blob_size(code: str, dim: int) -> int:
    """Bytes of one stored crop view."""
    return 2 * dim if code == FLOAT16 else (dim + 3) // 4


def encode(code: str, vectors: np.ndarray) -> list[bytes]:
    """Unit-length float vectors (n, dim) as stored blobs."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if code == FLOAT16:
        return [row.tobytes() for row in vectors.astype("<f2")]
    n, dim = vectors.shape
    levels = np.searchsorted(THRESHOLDS, vectors * np.float32(np.sqrt(dim))).astype(np.uint8)  # 0..3
    padded = np.zeros((n, 4 * blob_size(code, dim)), np.uint8)
    padded[:, :dim] = levels
    quads = padded.reshape(n, -1, 4)
    packed = quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)
    return [row.tobytes() for row in packed]


def decode(code: str, blobs: bytes, n: int, dim: int) -> np.ndarray:
    """`n` stored views (their blobs joined, each `blob_size` bytes) as float32 rows (n, dim): for
    2-bit codes, their levels scaled to unit length, as the vectors they stand for were (scores are
    taken around the collection's mean, where length would matter)."""
    if len(blobs) != n * blob_size(code, dim):
        raise ValueError(f"{len(blobs)} bytes are not {n} crop views of {dim} dimensions")
    if code == FLOAT16:
        return np.frombuffer(blobs, "<f2").reshape(n, dim).astype(np.float32)
    packed = np.frombuffer(blobs, np.uint8).reshape(n, -1)
    rows = _BYTE_LEVELS[packed].reshape(n, -1)[:, :dim]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # never 0: no level is
