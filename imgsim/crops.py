"""Crop views: a search's best candidates scored by the centres of their pictures too.

A tight crop of a small picture (its centre half, made grey) has a global descriptor far from the
whole picture's, and a different picture of the same look can score higher. An index keeps, beside
each image's own vector, the vectors of its centre (`Preprocess.crop_views`: by default
`DEFAULT_CROP_VIEWS`, the centre 60 % of each side in grey, seen both sharp and blurred (`embed`);
`imgsim index --centre-view`: `CROP_VIEWS`, 70 % and 50 %; `--no-centre-view`: none), embedded
from the picture as it is indexed and stored as 2-bit codes (`crop_codes.py`). They are not in the
graph: the graph proposes candidates by the image's own vector as always, and the best
`CROP_CANDIDATES` of them, once re-scored exactly, score by whichever is higher, their own vector or
their best crop view less `CROP_PENALTY`. Measured with scripts/eval_retrieval.py (README "How good is it"): grey centres find
grey crops far more often than colour ones and colour crops as often (the whole picture's vector
finds those), and re-scoring the best 32 candidates finds nearly as many as searching the crop
views themselves would; the penalty keeps an exact copy (1.0) and everyday edits ahead of a picture
that merely contains something like the query.
"""

from __future__ import annotations

import numpy as np

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import crop_codes
from . import images as imgs
from .manifest import Manifest
from .scoring import Pool
from .store import Store

if TYPE_CHECKING:
    from .models import Model

DEFAULT_CROP_VIEWS = ("soft60",)
"""The crop view every new index keeps unless told otherwise: the centre 60 % in grey, seen as it is
and blurred (`images.SOFT_BLUR`), 322 bytes (README "How good is it": ``grey60``, the seventh step,
found tight grey crops at 0.97-0.98 instead of 0.84 for one model run more a picture; the eighth
step's soft view, two runs more, finds a crop that is blurred too more often)."""

CROP_VIEWS = ("grey70", "grey50")
"""The crop views `imgsim index --centre-view` keeps: the centre 70 % and 50 % in grey (README "How
good is it": in colour, as the first crop views were, grey crops were found 1.5 points less often)."""

CROP_PENALTY = 0.06
"""What a crop view's score gives up against the image's own (cosine)."""

CROP_CANDIDATES = 32
"""How many of a search's best candidates are scored by their crop views too."""


def embed(model: Model, views: Sequence[imgs.Views]) -> tuple[np.ndarray, np.ndarray]:
    """(N, dim) vectors and (N, crop views, dim) crop-view vectors of N pictures' `images.Views`
    (`images.load_views`): a soft view's vector is its sharp embedding plus `images.SOFT_WEIGHT` of
    its blurred one (embedded at a smaller size, in one batch of their own), made unit length."""
    prep = model.preprocess
    vectors, crop_vectors = model.embed_views(np.stack([v.arrays for v in views]), len(prep.crop_views))
    soft = [n for n, view in enumerate(prep.crop_views) if imgs.is_soft(view)]
    if soft:
        blurred = model.embed(np.concatenate([v.soft for v in views])).reshape(len(views), len(soft), -1)
        crop_vectors = crop_vectors.copy()
        both = crop_vectors[:, soft] + imgs.SOFT_WEIGHT * blurred
        crop_vectors[:, soft] = both / np.maximum(np.linalg.norm(both, axis=2, keepdims=True), 1e-12)
    return vectors, crop_vectors


def rerank(store: Store, manifest: Manifest, query: np.ndarray, scores: np.ndarray,
           ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new scores, order) of candidates (`scores`, `ids`: re-scored exactly, best first) once the
    first `CROP_CANDIDATES` are also scored by their crop views (the manifest's, stored as its
    `crop_code` says; scored as the graph scores vectors): each scores the higher of its own score
    and its best crop view's less `CROP_PENALTY`. `order` sorts them again (stable: ties keep the
    graph's order)."""
    views, dim, code = len(manifest.preprocess.crop_views), manifest.dim, manifest.preprocess.crop_code
    head = min(len(ids), CROP_CANDIDATES)
    if not head:
        return scores, np.arange(len(ids))
    found, blobs = store.crop_bytes(ids[:head], views, crop_codes.blob_size(code, dim))
    if not len(found):
        return scores, np.arange(len(ids))
    if code == crop_codes.FLOAT16:  # scored from the float16 bytes, as the candidates' own vectors are
        by_view = Pool(np.repeat(found, views), blobs, dim, manifest.center).scores(query[None])[0]
    else:
        by_view = _coded_scores(query, blobs, len(found) * views, dim, manifest.center)
    by_view = by_view.reshape(len(found), views)
    best = np.max(np.where(np.isnan(by_view), -np.inf, by_view), axis=1) - CROP_PENALTY  # NaN: damaged
    position = {i: n for n, i in enumerate(ids[:head].tolist())}
    rows = np.array([position[i] for i in found.tolist()], np.int64)
    new = scores.copy()
    new[rows] = np.maximum(scores[rows], best.astype(scores.dtype))
    order = np.argsort(-new, kind="stable")
    return new[order], order


def _coded_scores(query: np.ndarray, blobs: bytes, n: int, dim: int, center: np.ndarray | None) -> np.ndarray:
    """Scores of `n` 2-bit views against `query` (unit length) as `Graph.score_against` scores them
    decoded (`centred_scores`, from `crop_codes.dots`)."""
    return centred_scores(lambda vectors: crop_codes.dots(blobs, n, dim, vectors), query, center)


def centred_scores(dots: Callable[[np.ndarray], np.ndarray], query: np.ndarray, center: np.ndarray | None,
                   with_center: np.ndarray | None = None) -> np.ndarray:
    """The cosine of views and `query` (unit length) around the collection's mean `center` (plain
    without one), from dot products alone: `dots(vectors)` gives each view's dot (as a unit vector)
    with each of `vectors` ((k, dim) -> (k, views)); `with_center`, where known, their dots with
    `center`. For a view x and q' = q - c made unit length: ((x - c).q') / |x - c|, where
    |x - c|^2 = 1 - 2 x.c + |c|^2. NaN for a damaged view, as `dots` gives."""
    if center is None:
        return dots(query[None])[0]
    around = query - center
    around /= max(float(np.sqrt(around @ around)), 1e-12)
    if with_center is None:
        with_query, with_center = dots(np.stack([around, center]))
    else:
        (with_query,) = dots(around[None])
    with np.errstate(invalid="ignore", over="ignore"):  # a damaged view's NaN passes through
        return (with_query - float(center @ around)) / np.sqrt(np.maximum(1 - 2 * with_center
                                                                          + float(center @ center), 1e-24))
