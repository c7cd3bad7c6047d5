"""How crop-view vectors are stored: as float16 (indexes made before format 6) or as 2-bit codes.

A crop view only re-scores a search's best few candidates against the query (`crops.py`), which
measurably needs far less than float16. A 2-bit code keeps, for each value of the vector, which of
four levels (`LEVELS`) is nearest to its distance from the vector's own mean in units of their
spread (standard deviation), four values to a byte, and before them the mean in those units
(float16): a 1280-d view takes 322 bytes instead of 2,560. Decoded, it is the levels plus that
mean, made unit length (a vector's length and scale do not matter to a cosine). The eval harness
finds the same pictures with either (README "How good is it", seventh step). Codes need no
training: each view is coded alone, the same way whenever it is made. A damaged code can only
mis-score its own image (a mean that is not finite makes its scores NaN, which a search passes
over and `imgsim verify` reports); `decode` checks lengths.
"""

from __future__ import annotations

import numpy as np

FLOAT16 = "f16"
"""Float16 values, little-endian, as the images' own vectors (crop views of formats 4 and 5)."""

TWO_BIT = "2bit"
"""Four levels a value, four values a byte, after the vector's mean (format 6 on: every new index
with crop views)."""

CODES = (FLOAT16, TWO_BIT)

LEVELS = np.array([-2.335, -0.4625, 0.4625, 2.335], np.float32)
"""The four levels, in standard deviations from the vector's mean: Lloyd's optimum for the values
of efficientnet-lite0-lw's grey centre views of 3,000 clip-art pictures (openclipart, none of them
in the evaluation), heavier-tailed than a Gaussian's (kurtosis 8.4): a coded view's cosine with its
vector is 0.90 on average on the evaluation's pictures, against 0.88 with a Gaussian's levels. Taken
from the vector's own mean, they suit models whose values are all positive too (plain
efficientnet-lite0, resnet50): 0.95 there, against 0.86 from zero."""

THRESHOLDS = np.array([-1.4, 0.0, 1.4], np.float32)
"""Where one level gives way to the next (halfway between them)."""

HEAD_BYTES = 2
"""Bytes before the codes: the mean over the spread, float16, little-endian."""

BYTE_LEVELS = LEVELS[(np.arange(256)[:, None] >> (2 * np.arange(4))) & 3]
"""(256, 4): the four levels each byte's value codes, lowest bits first."""


def blob_size(code: str, dim: int) -> int:
    """Bytes of one stored crop view."""
    return 2 * dim if code == FLOAT16 else HEAD_BYTES + (dim + 3) // 4


def encode(code: str, vectors: np.ndarray) -> list[bytes]:
    """Float vectors (n, dim), unit length, as stored blobs."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if code == FLOAT16:
        return [row.tobytes() for row in vectors.astype("<f2")]
    n, dim = vectors.shape
    mean = vectors.mean(axis=1, keepdims=True)
    spread = np.maximum(vectors.std(axis=1, keepdims=True), 1e-12)  # a constant vector: every code 1 or 2
    levels = np.searchsorted(THRESHOLDS, (vectors - mean) / spread).astype(np.uint8)  # 0..3
    padded = np.zeros((n, 4 * ((dim + 3) // 4)), np.uint8)
    padded[:, :dim] = levels
    quads = padded.reshape(n, (dim + 3) // 4, 4)
    packed = quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)
    head = np.clip(mean / spread, -60000, 60000).astype("<f2").view(np.uint8)  # (n, 2)
    return [row.tobytes() for row in np.concatenate([head, packed], axis=1)]


def decode(code: str, blobs: bytes, n: int, dim: int) -> np.ndarray:
    """`n` stored views (their blobs joined, each `blob_size` bytes) as float32 rows (n, dim), unit
    length for 2-bit codes (as the vectors they stand for were: scores are taken around the
    collection's mean, where length would matter); NaN rows for a damaged 2-bit code."""
    if len(blobs) != n * blob_size(code, dim):
        raise ValueError(f"{len(blobs)} bytes are not {n} crop views of {dim} dimensions")
    if code == FLOAT16:
        return np.frombuffer(blobs, "<f2").reshape(n, dim).astype(np.float32)
    mean, levels = _levels(blobs, n, dim)
    rows = levels[:, :dim] + mean
    with np.errstate(invalid="ignore", over="ignore"):  # a damaged mean: NaN, passed over
        rows /= np.maximum(np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None], 1e-12)
    return rows


def dots(blobs: bytes, n: int, dim: int, vectors: np.ndarray) -> np.ndarray:
    """(len(vectors), n): each row of `vectors` (float32, (k, dim)) dotted with each of `n` 2-bit
    views as `decode` makes them (unit length), without making those unit rows: a view is its levels
    L plus its mean m, so its dot with v is (L.v + m sum(v)) / |L + m|, where |L + m|^2 is
    |L|^2 + 2 m sum(L) + dim m^2. A search scores its best candidates' views this way (`crops.py`):
    a few matrix-vector products instead of a decoded, centred and normalised copy of every view.
    NaN for a damaged code, as `decode`."""
    if len(blobs) != n * blob_size(TWO_BIT, dim):
        raise ValueError(f"{len(blobs)} bytes are not {n} crop views of {dim} dimensions")
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    mean, levels = _levels(blobs, n, dim)
    mean = mean[:, 0] if np.isfinite(mean).all() else np.where(np.isfinite(mean[:, 0]), mean[:, 0], np.nan)
    levels = levels[:, :dim]  # the padding's levels are not the view's
    squares = np.einsum("ij,ij->i", levels, levels)
    length = np.sqrt(np.maximum(squares + mean * (2 * levels.sum(axis=1) + dim * mean), 1e-24))
    # One matrix-vector product a vector: far quicker than one matrix product for a few vectors.
    return np.stack([(levels @ v + mean * v.sum()) / length for v in vectors])


def _levels(blobs: bytes, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(means (n, 1), levels (n, 4 x bytes of codes), padding included) of `n` 2-bit views."""
    raw = np.frombuffer(blobs, np.uint8).reshape(n, blob_size(TWO_BIT, dim))
    mean = raw[:, :HEAD_BYTES].copy().view("<f2").astype(np.float32)  # (n, 1)
    # np.take, not fancy indexing: ten times faster here (a search decodes 32 of them)
    return mean, np.take(BYTE_LEVELS, raw[:, HEAD_BYTES:], axis=0).reshape(n, 4 * (raw.shape[1] - HEAD_BYTES))


def damaged(code: str, blobs: bytes, n: int, dim: int) -> np.ndarray:
    """Which of `n` stored views (checked lengths) are damaged: not finite unit vectors (float16),
    or a mean that is not finite (2-bit codes)."""
    from .scoring import damaged_rows

    if code == FLOAT16:
        return damaged_rows(decode(code, blobs, n, dim))
    raw = np.frombuffer(blobs, np.uint8).reshape(n, blob_size(code, dim))
    return ~np.isfinite(raw[:, :HEAD_BYTES].copy().view("<f2")[:, 0])
