"""The HNSW graph derived from the store, and scoring with it.

SQLite holds the truth; `Graph` keeps the FAISS file in step with it: it loads the file (after its
checksum and structure are checked), rebuilds it when it is missing or damaged, catches it up when it
lags behind SQLite (ids only grow, so it lacks exactly the ids above its largest), tracks the ids of
removed rows that HNSW cannot delete, learns the collection's mean, and writes the file back staged,
recorded in the manifest, then renamed, so a crash at any point leaves a file the manifest knows.

Scores are cosine similarity; from `CENTER_MIN_IMAGES` images on, cosine around the collection's mean.
The graph holds 8-bit codes, not the vectors (see `ann.py`): it proposes candidates (at least
`RERANK_CANDIDATES` with a mean) by approximate cosine, and they are re-scored exactly from the
float16 vectors in SQLite, fetched in one query. Each vector is stored once; the graph is derived.
From `REDUCE_FROM` images on, the graph is *reduced*: it compares the vectors' projections onto the
collection's `REDUCED_DIM` main directions (see `ann.py`), which the exact re-scoring makes up for;
its candidates are read best first, in steps, until none left could still enter the top k, and a
search walks it shallowly first, deeper only where the shallow walk's candidates cannot settle that.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .scoring import Pool, damaged_rows
from .errors import ImgsimError, IndexCorruptError
from .files import discard, publish
from .hnsw import HnswParams
from .manifest import Manifest
from .models import normalize
from .store import Store

if TYPE_CHECKING:
    from .ann import AnnIndex

log = logging.getLogger("imgsim")

REBUILD_DEAD_FRACTION = 0.2
"""Rebuild the graph once this share of its entries belong to removed images."""

CENTER_MIN_IMAGES = 200
"""From this many images on, scores are cosine after subtracting the collection's mean vector
(taken from the graph at each save), which scripts/eval_retrieval.py measured as better for both
near-duplicates and categories. Below it the mean says too little about the collection."""

RERANK_CANDIDATES = 64
"""With a mean, the graph (plain cosine) proposes this many candidates, re-scored exactly."""

RERANK_FIRST = 32
"""A reduced graph's candidates are re-scored best first, this many first (see `Graph._rescore`); an
unfiltered search for at most half as many results first walks it for only this many (see
`_ShallowWalks`)."""

SHALLOW_WORTH = 0.6
"""A reduced graph is walked shallowly first while at least this share of such walks settle a
search (see `_ShallowWalks`): below it, walking twice costs more than it saves."""

SHALLOW_RETRY = 16
"""While shallow walks do not pay, every this-many-th search tries one again."""

RERANK_MARGIN = 0.02
"""How much further than the worst error seen so far a candidate not yet read could be, in cosine."""

RERANK_CANDIDATES_PLAIN = 40
"""Without a mean, at least this many candidates (the graph's scores are approximate)."""

TRAIN_SAMPLE = 10_000
"""The graph's quantizer learns each dimension's range from up to this many vectors."""

RETRAIN_GROWTH = 4
"""A quantizer trained on fewer than `TRAIN_SAMPLE` vectors is retrained (the graph rebuilt, in
memory, from SQLite) once the graph holds this many times as many: a collection indexed 16 images
at a time is retrained at 64, 256, ... 16384 images, about 22,000 vectors of graph building in all
(tens of seconds here), next to the hours it takes to embed that many photos."""

REDUCE_FROM = 10_000
"""A graph (re)built or first trained with at least this many vectors is reduced to `REDUCED_DIM`
dimensions: a collection grown a few images at a time gets there at its retraining (below)."""

REDUCED_DIM = 256
"""A reduced graph's dimension. Its 8-bit codes take 256 bytes an image instead of 1,280 (at
1280-d), and a graph walk about a third of the work. Recall@10 after re-scoring (scripts/bench_scale.py):
0.991-1.000 at 100k; at 1M 0.998 on isotropic vectors and 0.917 on real-picture-like ones with
efConstruction 80, 0.995 at 320 (now the default): the graph, not the projection, lost them."""

BUILD_BATCH = 50_000
"""A (re)build adds the stored vectors to the graph this many at a time. FAISS builds a better graph
from larger `add` calls: a million real-picture-like vectors at efConstruction 320, 2 threads,
held the true top 10 among 64 candidates for 0.995 of queries added 50,000 at a time, 0.986 added
10,000 at a time (README). 50,000 float32 vectors of 1280-d are 256 MB while they are added."""

DUPES_MARGIN = 0.05
"""Duplicate finding over a reduced graph (`Graph._score_above`) reads every candidate whose
approximate score is within the largest excess seen plus this of the threshold."""

MEAN_SAMPLE = 20_000
"""A reduced graph's codes say nothing of the vectors' mean, so it is estimated from this many
live vectors, drawn at random from SQLite (all of them below that)."""

EXACT_FILTER_LIMIT = 20_000
"""A filter matching at most this many images is answered by a scan of just those images' 8-bit
codes (cheaper than a graph walk that must skip almost every node, and never short of results),
whose best candidates are then re-scored exactly."""

SCAN_CANDIDATES_REDUCED = 512
"""A filtered scan of a reduced graph's codes re-scores this many candidates exactly. On lite0
features of real pictures 16 would do (the projection keeps 85% of their variance); the synthetic
vectors of scripts/bench_scale.py, whose near neighbours differ by noise spread evenly over all
1280 dimensions, need 512 for recall@10 0.99 under a 1% filter at 100k (128: 0.85, 256: 0.94), and
even 512 gives only 0.61 at 1M with 10,000 images in the filter (README). They are read in steps
(`Graph._rescore`): real-picture-like vectors stop after ~80 (from 32: 32, 64, 128...)."""

FILTER_EF_MAX = 1024
"""The deepest graph walk a filtered search makes before falling back to an exact scan."""


@contextmanager
def _ctrl_c_deferred():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise it: FAISS checks for signals inside long
    calls and abandons them halfway, which would leave the graph and its id map out of step."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@dataclass(frozen=True)
class FileCheck:
    """What `Graph.check_file` found in the FAISS file, without changing anything."""

    problem: str | None = None
    missing: bool = False
    lagging: int = 0
    dead: int = 0
    duplicate_ids: bool = False


class Graph:
    """The FAISS side of an open index. `store` and `manifest` belong to the `Index` that owns it."""

    def __init__(self, store: Store, manifest: Manifest, faiss_path: Path):
        self._store = store
        self._manifest = manifest
        self.path = faiss_path
        self._ann: AnnIndex | None = None
        self._dirty = False
        self._trained_on: int | None = manifest.graph_trained_on
        self._damaged_reported: set[int] = set()
        self._shallow = _ShallowWalks()
        self._crop_scan: tuple[tuple[int, int], object] | None = None  # (version, crop_scan.CropScan or None)

    # -- the graph, loaded on first use -----------------------------------------------------------
    @property
    def ann(self) -> AnnIndex:
        """The HNSW index, loaded on first use and brought up to date with SQLite if it lags."""
        if self._ann is None:
            self._ann = self._load_or_rebuild()
            self._catch_up()
        return self._ann

    @property
    def dirty(self) -> bool:
        """True when the graph in memory differs from the file (it is written at the next save), or
        lacks rows the store holds (committed, then a Ctrl-C before they were added)."""
        if self._dirty or self._ann is None or self._store.read_only:
            return self._dirty
        try:
            return self._store.max_id() > self._ann.max_id()
        except sqlite3.DatabaseError:  # a damaged file: nothing sensible to write
            return False

    @property
    def centred(self) -> bool:
        return self._manifest.center is not None

    def __len__(self) -> int:
        return len(self.ann)

    @property
    def dead_count(self) -> int:
        return self.ann.dead_count

    @property
    def code_dim(self) -> int:
        """The dimensions the graph compares: the vectors', or `REDUCED_DIM` for a reduced graph."""
        return self.ann.code_dim

    def _load_or_rebuild(self) -> AnnIndex:
        from .ann import AnnIndex  # FAISS is loaded by the first command that needs the graph

        m = self._manifest
        if not m.faiss_checksums and len(self._store) == 0:
            return AnnIndex.empty(m.dim, m.hnsw)
        if m.faiss_checksums and self.path.exists():
            try:
                # A reader maps the file (nothing is added to it); a writer reads it into memory.
                return AnnIndex.load(self.path, m.faiss_checksums, m.dim, m.hnsw, mapped=self._store.read_only)
            except IndexCorruptError as e:
                log.warning("%s; rebuilding it from %s", e, self._store.path.name)
        elif self.path.exists():
            log.warning("%s is from an older format (or not recorded); rebuilding it from %s", self.path.name,
                        self._store.path.name)
        elif not (self._store.read_only and not m.faiss_checksums and self._store.writer_active()):
            log.warning("%s is missing; rebuilding it from %s", self.path.name, self._store.path.name)
        if self._store.read_only:
            if self._store.writer_active():  # (a first `imgsim index` under way: no graph written yet)
                log.warning("another process is indexing: it writes %s when it finishes", self.path.name)
            else:
                log.warning("opened read-only, so the rebuilt graph is not saved: run `imgsim verify --repair` "
                            "(or open the index for writing) once to make it permanent")
        return self._build()

    def _new(self, count: int) -> AnnIndex:
        """An empty graph for a collection of `count` vectors: reduced from `REDUCE_FROM` on."""
        from .ann import AnnIndex

        return AnnIndex.empty(self._manifest.dim, self._manifest.hnsw,
                              reduce_to=REDUCED_DIM if count >= REDUCE_FROM else 0)

    def _build(self) -> AnnIndex:
        """A new graph of every stored vector, trained on `TRAIN_SAMPLE` of them drawn at random."""
        dim = self._manifest.dim
        ids = self._store.ids()
        ann = self._new(len(ids))
        if len(ids):
            sample = ids if len(ids) <= TRAIN_SAMPLE else \
                np.sort(np.random.default_rng(len(ids)).choice(ids, TRAIN_SAMPLE, replace=False))
            ann.train(self._store.vector_matrix(sample, dim)[1])
            for chunk_ids, vectors in self._store.vectors(dim, chunk=BUILD_BATCH):
                ann.add(chunk_ids, vectors)
        self._trained_on = min(len(ids), TRAIN_SAMPLE)
        self._dirty = True
        return ann

    def _catch_up(self) -> None:
        """Add the stored vectors the graph lacks (ids above its largest), through `add`, so that a
        graph not trained yet is trained (and reduced, and retrained as it grows) as usual."""
        caught_up = 0
        for ids, vectors in self._store.vectors(self._manifest.dim, after_id=self._ann.max_id(), chunk=BUILD_BATCH):
            self.add(ids, vectors)
            caught_up += len(ids)
        if caught_up:
            if self._store.read_only:  # nothing is written: a writer (or the next writer) saves them
                log.info("%s lacks %d stored vectors: added in memory for this run", self.path.name, caught_up)
            else:
                log.info("added %d vectors to %s that it was missing", caught_up, self.path.name)
            self._dirty = True
        self.forget_removed()

    # -- changes ----------------------------------------------------------------------------------
    def add(self, ids, vectors: np.ndarray) -> None:
        """Add vectors whose rows were just committed to the store."""
        if not len(ids):
            return
        ann = self.ann  # loading catches up with the store, which may already hold these very rows
        ids = np.asarray(ids, dtype=np.int64)
        new = ids > ann.max_id()  # ids only grow
        if not new.any():
            return
        if not ann.trained:
            self._trained_on = min(int(new.sum()), TRAIN_SAMPLE)
            if not len(ann) and not ann.reduced and new.sum() >= REDUCE_FROM:
                self._ann = ann = self._new(int(new.sum()))
        with _ctrl_c_deferred():  # FAISS stops an add at Ctrl-C halfway: graph and id map would disagree
            ann.add(ids[new], np.asarray(vectors)[new])
        self._dirty = True
        trained_on = self._trained_on
        if trained_on is not None and trained_on < TRAIN_SAMPLE and len(ann) >= RETRAIN_GROWTH * trained_on:
            self._ann = self._build()
            self.forget_removed()

    def forget_removed(self) -> None:
        """Exclude from every search the ids whose rows are gone from the store (the store keeps
        the ids it removed, a short list: no comparison of every id)."""
        ann = self.ann
        removed = self._store.removed_ids()
        dead = removed[_holds(ann.ids(), removed)] if len(removed) else removed
        if len(dead) != ann.dead_count:
            self._dirty = True
        ann.set_dead(dead)

    def save(self) -> None:
        """Write the graph (rebuilt first if too many of its entries are dead) and record it. Rows
        committed but not yet added (a Ctrl-C between the two) are added first, so the file saved
        always holds every stored vector. A Ctrl-C while the file is written waits for it."""
        ann = self.ann
        self._catch_up()
        if ann.dead_count > REBUILD_DEAD_FRACTION * max(1, len(ann)):
            self._ann = ann = self._build()
        with _ctrl_c_deferred():
            self._write(ann)

    def _write(self, ann: AnnIndex) -> None:
        staged, digest = ann.stage(self.path)
        mean = self._mean(ann) if len(ann) - ann.dead_count >= CENTER_MIN_IMAGES else None
        previous = self._manifest.faiss_sha256
        try:
            with self._store.transaction():
                self._store.set_manifest(faiss_sha256=digest, faiss_previous_sha256=previous,
                                         center=None if mean is None else [float(v) for v in mean],
                                         graph_trained_on=self._trained_on)
            publish(staged, self.path)
        except BaseException:
            discard(staged)
            raise
        self._manifest.faiss_sha256, self._manifest.faiss_previous_sha256 = digest, previous
        self._manifest.center = mean
        self._manifest.graph_trained_on = self._trained_on
        self._dirty = False

    def _mean(self, ann: AnnIndex) -> np.ndarray:
        """The mean of the live vectors: from the graph's codes, or for a reduced graph estimated
        from up to `MEAN_SAMPLE` of them read from SQLite."""
        mean = ann.mean()
        if mean is not None:
            return mean
        ids = ann.live_ids()
        if len(ids) > MEAN_SAMPLE:
            ids = np.sort(np.random.default_rng(len(ids)).choice(ids, MEAN_SAMPLE, replace=False))
        total, count = np.zeros(self._manifest.dim, np.float64), 0
        for start in range(0, len(ids), 4096):
            found, vectors = self._store.vector_matrix(ids[start:start + 4096], self._manifest.dim)
            total += vectors.sum(axis=0, dtype=np.float64)
            count += len(found)
        return (total / max(count, 1)).astype(np.float32)

    def rebuild(self) -> None:
        """Rebuild the graph from the vectors in SQLite and write it. An index made with a lower
        efConstruction than today's default is rebuilt (and recorded) with the default: it only says
        how hard the build looks for links, so the file's layout and the searches are the same."""
        default = HnswParams().ef_construction
        if self._manifest.hnsw.ef_construction < default:
            hnsw = replace(self._manifest.hnsw, ef_construction=default)
            with self._store.transaction():
                self._store.set_manifest(hnsw=hnsw.to_dict())
            self._manifest.hnsw = hnsw
        self._ann = self._build()
        self.save()

    # -- reading ----------------------------------------------------------------------------------
    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids that are stored, in the order given (float32, from SQLite)."""
        return self._store.vector_matrix(np.asarray(ids, dtype=np.int64), self._manifest.dim)

    def search(self, query: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef: int | None = None,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the `k` best matches for one query vector, best first.

        `allowed` (live ids, e.g. from a metadata filter) restricts the search; a very selective
        filter, or `exact`, is answered by scanning the vectors instead of walking the graph, and a
        filtered walk that comes back short of `k` while more images match is redone exactly.
        """
        scores, ids, _, _ = self.search_pool(query, k, allowed=allowed, ef=ef, exact=exact)
        return scores[:k], ids[:k]

    def search_pool(self, query: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef: int | None = None,
                    exact: bool = False) -> tuple[np.ndarray, np.ndarray, Pool | None, np.ndarray]:
        """As `search`, but every candidate re-scored (at least `k` where as many exist), best first,
        with the `Pool` of their vectors and each one's position in it, so that they can be scored
        against more queries without another read (query expansion). An exact scan has no pool.
        In an index with crop views, the best candidates are scored by those too (`crops.rerank`)."""
        views = len(self._manifest.preprocess.crop_views)
        if not views:
            return self._search_pool(query, k, allowed=allowed, ef=ef, exact=exact)
        from . import crop_scan, crops

        # Exact scans (and filtered walks' fallbacks to them) return as many as asked; walks re-score
        # at least as many anyway, and a search for few results keeps its shallow walk.
        scores, ids, pool, positions = self._search_pool(query, k, allowed=allowed, ef=ef, exact=exact,
                                                         scanned=max(k, crops.CROP_CANDIDATES))
        if len(ids):
            query = normalize(np.asarray(query, dtype=np.float32).reshape(1, -1))[0]
            scores, order = crops.rerank(self._store, self._manifest, query, scores, ids)
            ids = ids[order]
            positions = positions[order] if pool is not None else positions
            if scores[0] < crop_scan.SCAN_BELOW:
                return self._crop_candidates(query, scores, ids, pool, positions, allowed)
        return scores, ids, pool, positions

    def _crop_candidates(self, query: np.ndarray, scores: np.ndarray, ids: np.ndarray, pool: Pool | None,
                         positions: np.ndarray, allowed: np.ndarray | None,
                         ) -> tuple[np.ndarray, np.ndarray, Pool | None, np.ndarray]:
        """An uncertain search of a smaller index (`crop_scan`): every candidate scored by its crop
        views too, and the best `crop_scan.SCAN_CANDIDATES` other images by theirs added, best first
        again. `query` is unit length; `allowed` limits the added ones as it limits a search."""
        from . import crop_scan
        from .crops import CROP_PENALTY

        version = crop_scan.version(self.ann)
        if self._crop_scan is None or self._crop_scan[0] != version:
            self._crop_scan = (version, crop_scan.build(self.ann, self._store, self._manifest))
        scan = self._crop_scan[1]
        if scan is None or not len(scan):
            return scores, ids, pool, positions
        by_crop = scan.scores(query)  # by scan.ids, ascending
        at = np.minimum(np.searchsorted(scan.ids, ids), len(scan.ids) - 1)
        scored = scan.ids[at] == ids
        scores = np.maximum(scores, np.where(scored, by_crop[at], -np.inf) - CROP_PENALTY).astype(np.float32)
        usable = np.isfinite(by_crop) & ~_holds(ids, scan.ids)
        if allowed is not None:
            usable &= _holds(allowed, scan.ids)
        # only those that would clearly lead: a crop view that merely ties with the graph's best is as
        # likely a plain centre that looks like many pictures (`crop_scan.SCAN_MARGIN`)
        usable &= by_crop - CROP_PENALTY > scores[0] + crop_scan.SCAN_MARGIN
        pick = np.flatnonzero(usable)
        pick = pick[np.argsort(-by_crop[pick], kind="stable")[:crop_scan.SCAN_CANDIDATES]]
        if len(pick):
            if pool is not None:
                found, blobs = self._store.vector_bytes(scan.ids[pick], self._manifest.dim)
                since = len(pool)
                pool.add(found, blobs)
                own = pool.scores(query[None], since)[0]
                positions = np.concatenate([positions, np.arange(since, since + len(found))])
            else:
                found, matrix = self.vectors(scan.ids[pick])
                own = np.where(damaged_rows(matrix), np.nan, self.score_against(query, matrix))
            own = np.where(np.isnan(own), -np.inf, own)  # a damaged stored vector: never chosen
            added = np.maximum(own, by_crop[np.searchsorted(scan.ids, found)] - CROP_PENALTY)
            scores, ids = np.concatenate([scores, added.astype(np.float32)]), np.concatenate([ids, found])
        order = np.argsort(-scores, kind="stable")
        order = order[np.isfinite(scores[order])]
        return scores[order], ids[order], pool, positions[order] if pool is not None else positions

    def _search_pool(self, query: np.ndarray, k: int, *, allowed: np.ndarray | None, ef: int | None,
                     exact: bool, scanned: int = 0) -> tuple[np.ndarray, np.ndarray, Pool | None, np.ndarray]:
        """`search_pool` without crop views; an exact scan returns at least `scanned` candidates."""
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != self._manifest.dim:
            raise ImgsimError(f"query vector has {query.shape[0]} dimensions; this index has {self._manifest.dim}")
        if not np.isfinite(query).all() or not np.any(query):
            raise ImgsimError("query vector must be finite and not all zeros")
        query = normalize(query[None])[0]
        ann = self.ann
        nothing = np.empty(0, np.int64)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                return np.empty(0, np.float32), nothing, None, nothing
        if exact:
            return (*self._exact(query, max(k, scanned), allowed), None, nothing)
        wanted = max(k, RERANK_CANDIDATES if self.centred else RERANK_CANDIDATES_PLAIN)
        if allowed is not None and len(allowed) <= EXACT_FILTER_LIMIT:
            # A reduced graph's codes rank more coarsely: its scans re-score more candidates.
            approx, ids = ann.scan(query, max(wanted, SCAN_CANDIDATES_REDUCED) if ann.reduced else wanted, allowed)
            return self._rescore(query, ids, approx if ann.reduced else None, k)
        if ann.reduced and allowed is None and ef is None and k <= RERANK_FIRST // 2 and RERANK_FIRST < wanted \
                and self._manifest.hnsw.ef_search <= wanted and self._shallow.worth_trying():
            # A shallow walk first; the full one only if its candidates cannot settle the top k.
            approx, ids = self._walk(query, RERANK_FIRST, RERANK_FIRST, None)
            walked_deeper = False

            def walk_deeper() -> tuple[np.ndarray, np.ndarray]:
                nonlocal walked_deeper
                walked_deeper = True
                return self._walk(query, wanted, wanted, None)

            found = self._rescore(query, ids, approx, k, deeper=walk_deeper)
            self._shallow.record(settled=not walked_deeper)
            return found
        ef = ef or self._manifest.hnsw.ef_search
        if allowed is not None:  # the walk skips nodes outside the filter: look deeper the fewer match
            ef = min(FILTER_EF_MAX, max(ef, int(ef * len(ann) / len(allowed))))
        approx, ids = self._walk(query, wanted, max(ef, wanted), allowed)
        if allowed is not None and len(ids) < min(k, len(allowed)):
            return (*self._exact(query, max(k, scanned), allowed), None, nothing)
        return self._rescore(query, ids, approx if ann.reduced else None, k)

    def _walk(self, query: np.ndarray, count: int, ef: int,
              allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(approximate scores, ids) of the graph walk's best `count` for one query, best first."""
        approx, ids = self.ann.search(query[None], count, ef_search=ef, allowed=allowed)
        return approx[0][ids[0] >= 0], ids[0][ids[0] >= 0]

    def neighbours(self, ids: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
                   ef: int | None = None, min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each of `ids` (held by the graph), its `k` nearest other images as (ids, scores) arrays
        of shape (len(ids), k), best first, scored exactly as `search` scores (centred if the index is);
        -1 marks gaps. One batched graph walk per call, so callers pass a thousand or so ids at a time.

        With `min_score` (duplicate finding), a reduced graph's candidates that cannot score that
        much are not read: see `_score_above`. Only neighbours scoring at least `min_score` are
        then sure to be there."""
        ids = np.asarray(ids, dtype=np.int64)
        out_ids, out_scores = np.full((len(ids), k), -1, np.int64), np.full((len(ids), k), -np.inf, np.float32)
        found, queries = self.vectors(ids)
        usable = ~damaged_rows(queries)
        if len(found) < len(ids) or not usable.all():  # a blob of the wrong size, or damaged values
            self._report_damaged(np.concatenate([np.setdiff1d(ids, found), found[~usable]]))
        rows = np.flatnonzero(np.isin(ids, found[usable]))
        if not len(rows):
            return out_ids, out_scores
        ids, queries = ids[rows], queries[usable]
        # Approximate scores: twice as many candidates, four times from a reduced graph, re-scored exactly below.
        wanted = (4 if self.ann.reduced else 2) * (k + 1)
        approx, near = self.ann.search(queries, wanted, ef_search=max(ef or self._manifest.hnsw.ef_search, wanted),
                                       allowed=allowed)
        near = np.where(near == ids[:, None], -1, near)  # an image is not its own neighbour
        scores = np.full(near.shape, -np.inf, np.float32)
        if min_score is not None and self.ann.reduced:
            self._score_above(queries, near, approx, float(min_score), scores)
        else:
            self._score_pairs_at(queries, near, near >= 0, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # fewer than k in a small index
        top = np.take_along_axis(scores, order, axis=1)
        out_scores[rows, :top.shape[1]] = top
        out_ids[rows, :top.shape[1]] = np.where(np.isfinite(top), np.take_along_axis(near, order, axis=1), -1)
        return out_ids, out_scores

    def _score_pairs_at(self, queries: np.ndarray, near: np.ndarray, at: np.ndarray, scores: np.ndarray) -> None:
        """Fill `scores` where `at` is set with the exact score of that query and candidate: every
        candidate's vector in one pass over SQLite, then all pairs scored at once."""
        cand_ids, cand = self._store.vector_matrix(np.unique(near[at]), self._manifest.dim)
        bad = damaged_rows(cand)
        if bad.any():  # never a duplicate of anything: left out, and said once
            self._report_damaged(cand_ids[bad])
            cand_ids, cand = cand_ids[~bad], cand[~bad]
        if not len(cand_ids):
            return
        where = np.minimum(np.searchsorted(cand_ids, near), len(cand_ids) - 1)
        rows, cols = np.nonzero(at & (cand_ids[where] == near))
        scores[rows, cols] = self._pair_scores(queries[rows], cand[where[rows, cols]])

    def _score_above(self, queries: np.ndarray, near: np.ndarray, approx: np.ndarray, min_score: float,
                     scores: np.ndarray) -> None:
        """`_score_pairs_at` for the candidates that could score `min_score`. A reduced graph's
        approximate score is the cosine of the vectors' projections, which for similar pictures is
        higher than the exact one (lite0 features of 3,800 pictures: never lower by more than 0.001;
        a near-copy is found by its projection as easily as by itself). So each image's best
        candidate is read first, which says how far an exact score can exceed its approximate one
        here, and then only the candidates whose approximate score is within that excess plus
        `DUPES_MARGIN` of `min_score`, again as long as what was read shows a larger excess. The
        rule is empirical (README, "Duplicates"): on real pictures' features and on synthetic
        ones it found every pair that reading every candidate finds."""
        valid = near >= 0
        read = valid & (np.cumsum(valid, axis=1) == 1)
        self._score_pairs_at(queries, near, read, scores)
        excess = -np.inf
        fresh = read
        while True:
            gained = fresh & np.isfinite(scores)
            if gained.any():
                excess = max(excess, float(np.max(scores[gained] - approx[gained])))
            fresh = valid & ~read & (approx >= min_score - max(0.0, excess) - DUPES_MARGIN)
            if not fresh.any():
                return
            self._score_pairs_at(queries, near, fresh, scores)
            read |= fresh

    def _pair_scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise scores of two equally long stacks of vectors, as `score_against` scores them,
        from dot products alone (no centred copies of the stacks are made)."""
        ab, aa, bb = (np.einsum("ij,ij->i", x, y) for x, y in ((a, b), (a, a), (b, b)))
        center = self._manifest.center
        if center is not None:
            ac, bc, cc = a @ center, b @ center, float(center @ center)
            ab, aa, bb = ab - ac - bc + cc, aa - 2 * ac + cc, bb - 2 * bc + cc
        return ab / np.sqrt(np.maximum(aa * bb, 1e-24))

    def score_against(self, vector: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Scores of each row of `matrix` against `vector`, as `search` scores them."""
        return self._prepare(matrix) @ self._prepare(vector[None])[0]

    def _exact(self, query: np.ndarray, k: int, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Score `query` against every stored vector in `ids` (all of them if None), in chunks so
        memory stays small."""
        best_scores, best_ids = np.empty(0, np.float32), np.empty(0, np.int64)
        if ids is None:
            chunks = self._store.vectors(self._manifest.dim, chunk=8192)
        else:
            chunks = (self.vectors(ids[start:start + 8192]) for start in range(0, len(ids), 8192))
        prepared = self._prepare(query[None])[0]
        for found, matrix in chunks:
            bad = damaged_rows(matrix)
            if bad.any():
                self._report_damaged(found[bad])
                found, matrix = found[~bad], matrix[~bad]
            scores = self._prepare(matrix) @ prepared
            scores, found = np.concatenate([best_scores, scores]), np.concatenate([best_ids, found])
            top = np.argsort(-scores, kind="stable")[:k] if len(scores) > k else np.argsort(-scores, kind="stable")
            best_scores, best_ids = scores[top], found[top]
        return best_scores, best_ids

    def _prepare(self, matrix: np.ndarray) -> np.ndarray:
        """Rows ready for scoring by inner product: centred if the index is, and unit length."""
        center = self._manifest.center
        return normalize(matrix - center) if center is not None else normalize(matrix)

    def _rescore(self, query: np.ndarray, ids: np.ndarray, approx: np.ndarray | None = None, k: int = 0,
                 deeper: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, Pool, np.ndarray]:
        """Exact scores of `query` against the stored vectors of `ids` (scored from the float16 bytes
        as they come), best first; with their `Pool` and positions in it.

        Without `approx`, all of them in one SQLite query. With `approx` (the graph's scores of `ids`,
        best first), in steps: the best `RERANK_FIRST` (at least `k`), then twice as many each time,
        stopping once no candidate left could enter the top `k`: that is, once the best approximate
        score left, plus the largest amount by which an exact score so far exceeded its approximate
        one, plus `RERANK_MARGIN`, is below the `k`-th best exact score. Where the graph's codes rank
        as the vectors do (real pictures' features) a search reads a fraction of its candidates;
        where they do not, it reads them all, as before.

        `deeper` (a shallow walk's caller) gives the candidates of a deeper walk: asked for once every
        candidate is read without that rule being met, taking the worst approximate score read as
        the best of those the shallow walk did not reach; the new ones are then read in the same way."""
        dim, pool = self._manifest.dim, Pool(np.empty(0, np.int64), b"", self._manifest.dim, self._manifest.center)
        end = len(ids) if approx is None or not k else min(len(ids), max(k, RERANK_FIRST))
        scores, excess, start = np.empty(0, np.float32), -np.inf, 0
        while True:
            found, blobs = self._store.vector_bytes(ids[start:end], dim)
            since = len(pool)
            pool.add(found, blobs)
            part = pool.scores(query[None], since)[0]
            usable = ~np.isnan(part)  # NaN: a damaged stored vector, never chosen
            if not usable.all():
                part = np.where(usable, part, -np.inf)
            scores = np.concatenate([scores, part]) if len(scores) else part
            if approx is not None and usable.any():
                given = approx[start:end] if len(found) == end - start else \
                    approx[start:end][_holds(found, ids[start:end])]
                excess = max(excess, float(np.max((part - given)[usable])))
            start = end
            settled = approx is not None and 0 < k <= len(scores) and \
                np.partition(scores, len(scores) - k)[len(scores) - k] > \
                approx[min(end, len(ids) - 1)] + excess + RERANK_MARGIN
            if end == len(ids) and deeper is not None and not settled and len(ids):
                more_approx, more_ids = deeper()
                deeper, new = None, ~_holds(ids, more_ids)
                ids, approx = np.concatenate([ids, more_ids[new]]), np.concatenate([approx, more_approx[new]])
            if end == len(ids) or settled:
                break
            end = min(len(ids), 2 * end)
        order = np.argsort(-scores, kind="stable")
        if np.isneginf(scores[order[-1:]]).any():  # damaged ones sort last: leave them out
            order = order[np.isfinite(scores[order])]
            self._report_damaged(pool.ids[~np.isfinite(scores)])
        return scores[order], pool.ids[order], pool, order

    def _report_damaged(self, ids: np.ndarray) -> None:
        """Say once per process which stored vectors were left out of results as damaged."""
        new = sorted(set(ids.tolist()) - self._damaged_reported)
        if new:
            self._damaged_reported.update(new)
            log.warning("the stored vectors of %d image(s) (ids %s) are missing or damaged: left out of results "
                        "(`imgsim verify --repair` removes them, and the next `imgsim index` embeds them again)",
                        len(new), ", ".join(map(str, new[:10])) + (", ..." if len(new) > 10 else ""))

    # -- checking ---------------------------------------------------------------------------------
    def check_file(self) -> FileCheck:
        """Read the FAISS file as it is on disk and compare it with the store; changes nothing."""
        from .ann import AnnIndex

        m = self._manifest
        if not self.path.exists():
            return FileCheck(missing=len(self._store) > 0)
        try:
            ann = AnnIndex.load(self.path, m.faiss_checksums, m.dim, m.hnsw, mapped=True)
        except IndexCorruptError as e:
            return FileCheck(problem=str(e))
        graph_ids, live = ann.ids(), self._store.ids()
        return FileCheck(lagging=len(np.setdiff1d(live, graph_ids)), dead=len(np.setdiff1d(graph_ids, live)),
                         duplicate_ids=len(np.unique(graph_ids)) != len(graph_ids))


class _ShallowWalks:
    """Whether a search should walk a reduced graph shallowly first (`RERANK_FIRST` candidates at that
    depth, about 0.6 of the full walk's time) and walk fully only if those cannot settle the top k
    (see `Graph._rescore`). It pays where most searches settle: 0.86-0.99 of them did on features of
    real pictures and vectors with their spectrum (README, "A shallow walk first"). Where the codes
    rank worse (vectors whose neighbours differ by noise spread over every dimension) nearly none
    do, and each search would walk twice: so the share that settled is followed (a moving average),
    and below `SHALLOW_WORTH` searches walk fully at once, trying a shallow walk again every
    `SHALLOW_RETRY`-th search."""

    def __init__(self) -> None:
        self._settled = 1.0
        self._skipped = 0

    def worth_trying(self) -> bool:
        if self._settled >= SHALLOW_WORTH:
            return True
        self._skipped += 1
        return self._skipped % SHALLOW_RETRY == 0

    def record(self, settled: bool) -> None:
        self._settled = 0.9 * self._settled + 0.1 * settled


def _holds(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each of `wanted`, whether `ids` holds it. The graph's ids are ascending (rows are added
    in id order), which makes this a binary search; otherwise a sort. (Not np.isin, whose np.unique
    imports numpy.ma: ~20 ms of a cold search.)"""
    if not len(ids):
        return np.zeros(len(wanted), bool)
    if not np.all(ids[1:] > ids[:-1]):
        ids = np.sort(ids)
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return ids[at] == wanted
