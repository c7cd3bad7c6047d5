"""Query expansion: results ranked for the query together with its best few matches.

A picture's nearest indexed images are, most of the time, of the same kind (or the same picture), and
together with the query they say more about what is wanted than the query alone (average query
expansion, Chum et al., 2007). The ranking is by ``q + w * (n1 + ... + nm)``: the query and its `m`
best matches as they are scored (centred on the collection's mean when the index is, unit length).
By default m = 3 and w = 0.5, what scripts/eval_retrieval.py measured best for category precision
(README, "How good is it"). The best match itself is always kept first: with one neighbour nothing
can outscore it anyway (it scores ``s(q, n) + w``, any other ``x`` scores ``s(q, x) + w * s(n, x)``,
less), with more an image close to all of them could, and it is held first explicitly. A
near-duplicate found first therefore stays first; what changes is the order after it.

The expanded query re-scores the candidates the graph walk already proposed and re-scored exactly
(`graph.RERANK_CANDIDATES` of them, or `k` if more; from a reduced graph, those it read: see
`Graph._rescore`), from the vectors that re-scoring read (the graph's `Pool`): no second read and
no second walk (`Expansion(walk=True)`, measured as no better,
walks again). Only an exact scan, which keeps no pool, reads the best candidates' vectors again.

Scores reported stay the similarity of the query itself to each result (a copy of the query still
shows 1.0, and `min_score` cuts on that), so they need not decrease down the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import RERANK_CANDIDATES, RERANK_CANDIDATES_PLAIN, Graph
from .models import normalize


@dataclass(frozen=True)
class Expansion:
    """How a search is expanded.

    `neighbours`: how many of the best matches are added to the query (with more than one, the best
    match is kept first explicitly: the guarantee above holds for one). `weight`: each one's weight
    against the query's 1. `min_score` / `max_score`: expand only when
    the best match scores at least / below this (None: always). `walk`: search the graph again with
    the query plus the best match (one neighbour only; a second walk, about twice the cost) instead
    of re-scoring the first walk's candidates."""

    weight: float = 1.0
    neighbours: int = 1
    min_score: float | None = None
    max_score: float | None = None
    walk: bool = False

    def applies(self, best: float) -> bool:
        return (self.min_score is None or best >= self.min_score) and (self.max_score is None or best < self.max_score)


DEFAULT = Expansion(weight=0.5, neighbours=3)
"""What `Index.search`, `search_many` and `similar` do unless told ``expand=False``."""


def resolve(expand: bool | Expansion | None) -> Expansion | None:
    """The `Expansion` an ``expand`` argument asks for (True: `DEFAULT`), or None for none."""
    if expand is None or expand is False:
        return None
    return DEFAULT if expand is True else expand


def search(graph: Graph, vector: np.ndarray, k: int, expansion: Expansion, *, allowed: np.ndarray | None,
           ef: int | None, exact: bool, skip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the `k` best matches for `vector` ranked by the expanded query, `skip` left out;
    the scores are the query's own. The neighbours are the best matches among those `allowed`."""
    wanted = max(k, RERANK_CANDIDATES if graph.centred else RERANK_CANDIDATES_PLAIN) + (skip is not None)
    # A walk re-scores (and pools) its candidates anyway, only as many as can matter for the k best
    # (see `Graph._rescore`); an exact scan returns what it is asked for.
    scores, ids, pool, positions = graph.search_pool(vector, wanted if exact else k + (skip is not None),
                                                     allowed=allowed, ef=ef, exact=exact)
    scores, ids = scores[:wanted], ids[:wanted]
    if skip is not None:
        keep = ids != skip
        scores, ids = scores[keep], ids[keep]
        positions = positions[:wanted][keep] if pool is not None else positions
    # With one result wanted, re-scoring cannot change it (the best match stays first); a walk could.
    if len(ids) < 2 or not expansion.applies(float(scores[0])) or (k == 1 and not expansion.walk):
        return scores[:k], ids[:k]
    if pool is not None and not expansion.walk:
        # The candidates' vectors are in the pool already: score them against the best matches too.
        positions = positions[:len(ids)]
        near = pool.scores(pool.vectors(positions[:expansion.neighbours]))
        expanded = scores + expansion.weight * near.sum(axis=0)[positions]
        expanded[0] = np.inf  # the best match stays first (for one neighbour it is anyway)
        order = np.argsort(-expanded, kind="stable")[:k]
        return scores[order], ids[order]
    found, matrix = graph.vectors(ids)
    at = {int(i): n for n, i in enumerate(found)}
    if int(ids[0]) not in at:  # removed since the walk: nothing to expand with
        return scores[:k], ids[:k]
    keep = np.array([int(i) in at for i in ids], dtype=bool)
    scores, ids = scores[keep], ids[keep]
    rows = matrix[[at[int(i)] for i in ids]]
    if expansion.walk:
        return _walk(graph, vector, rows[0], k, expansion, allowed=allowed, ef=ef, exact=exact, skip=skip)
    prepared = graph._prepare(rows)  # as the scores were computed: centred if the index is, unit length
    expanded = scores + expansion.weight * (prepared @ prepared[:expansion.neighbours].sum(axis=0))
    expanded[0] = np.inf  # the best match stays first (for one neighbour it is anyway)
    order = np.argsort(-expanded, kind="stable")[:k]
    return scores[order], ids[order]


def _walk(graph: Graph, vector: np.ndarray, neighbour: np.ndarray, k: int, expansion: Expansion, *,
          allowed: np.ndarray | None, ef: int | None, exact: bool, skip: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A second graph search with the query plus the neighbour (both unit length as stored), the
    results then scored against the query itself."""
    query = normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
    _, ids = graph.search(query + expansion.weight * neighbour, k + (skip is not None), allowed=allowed, ef=ef,
                          exact=exact)
    if skip is not None:
        ids = ids[ids != skip]
    found, matrix = graph.vectors(ids[:k])
    return graph.score_against(query, matrix).astype(np.float32), found
