"""Crop views: a search's best candidates scored by the centres of their pictures too.

A tight crop of a small picture (its centre half, made grey) has a global descriptor far from the
whole picture's, and a different picture of the same look can score higher. An index made with crop
views (`imgsim index --centre-view`; `Preprocess.crop_views`, by default the centre 70 % and 50 % of
each side, in grey) keeps, beside each image's own vector, the vectors of those centres, embedded
from the picture as it is indexed. They are not in the graph: the graph proposes candidates by the
image's own vector as always, and the best `CROP_CANDIDATES` of them, once re-scored exactly, score
by whichever is higher, their own vector or their best crop view less `CROP_PENALTY`. Measured with
scripts/eval_retrieval.py (README "How good is it"): grey centres find grey crops far more often
than colour ones and colour crops as often (the whole picture's vector finds those), and re-scoring
the best 32 candidates finds nearly as many as searching the crop views themselves would; the
penalty keeps an exact copy (1.0) and everyday edits ahead of a picture that merely contains
something like the query.
"""

from __future__ import annotations

import numpy as np

from .scoring import Pool
from .store import Store

CROP_VIEWS = ("grey70", "grey50")
"""The crop views `imgsim index --centre-view` keeps: the centre 70 % and 50 % in grey (README "How
good is it": in colour, as the first crop views were, grey crops were found 1.5 points less often)."""

CROP_PENALTY = 0.06
"""What a crop view's score gives up against the image's own (cosine)."""

CROP_CANDIDATES = 32
"""How many of a search's best candidates are scored by their crop views too."""


def rerank(store: Store, views: int, dim: int, center: np.ndarray | None, query: np.ndarray,
           scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new scores, order) of candidates (`scores`, `ids`: re-scored exactly, best first) once the
    first `CROP_CANDIDATES` are also scored by their `views` crop-view vectors: each scores the
    higher of its own score and its best crop view's less `CROP_PENALTY`. `order` sorts them again
    (stable: ties keep the graph's order)."""
    head = min(len(ids), CROP_CANDIDATES)
    if not head:
        return scores, np.arange(len(ids))
    found, blobs = store.crop_bytes(ids[:head], views, dim)
    if not len(found):
        return scores, np.arange(len(ids))
    pool = Pool(np.repeat(found, views), blobs, dim, center)
    by_view = pool.scores(query[None])[0].reshape(len(found), views)
    best = np.max(np.where(np.isnan(by_view), -np.inf, by_view), axis=1) - CROP_PENALTY  # NaN: damaged
    position = {i: n for n, i in enumerate(ids[:head].tolist())}
    rows = np.array([position[i] for i in found.tolist()], np.int64)
    new = scores.copy()
    new[rows] = np.maximum(scores[rows], best.astype(scores.dtype))
    order = np.argsort(-new, kind="stable")
    return new[order], order
