"""Finding groups of duplicate and near-duplicate images across a whole index, and acting on them.

Byte-identical files (the same sha256) are grouped first. Then every image's nearest neighbours are
taken from the HNSW graph in batches, and each pair scoring at least `threshold` joins the two
images' groups (union-find, so groups are transitive). Memory grows with the number of images and
of pairs found, never with its square. Each group names a keeper: a file in a reference folder if
there is one, else the most pixels, then the largest file, then the oldest.

`move_duplicates` moves every non-keeper into another folder under its relative path: it never
deletes and never overwrites, so moving the files back undoes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .defaults import DEFAULT_THRESHOLD  # noqa: F401 (for code that imported it here; the default is per model)
from .errors import ImgsimError
from .filters import Filter
from .scoring import damaged_rows


NEIGHBOURS = 8
"""How many nearest neighbours of each image are looked at."""

BATCH = 256
"""Images whose neighbours are looked up in one graph walk (bounded memory: ~BATCH x NEIGHBOURS vectors)."""

DUPES_EF = 48
"""Graph search depth for duplicate finding: near-copies are each other's nearest neighbours, so a
shallow walk finds them (measured in scripts/bench_dupes.py against an exact scan)."""


@dataclass
class DupeGroup:
    """Images that are copies of each other. `members` is keeper first; `scores[i]` is member i's
    similarity to the keeper (1.0 for the keeper and for byte-identical copies)."""

    keeper: dict
    members: list[dict]
    scores: list[float]
    identical: list[bool] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [m["path"] for m in self.members]

    def to_dict(self) -> dict:
        return {"keeper": self.keeper["path"], "paths": self.paths, "scores": [round(s, 6) for s in self.scores],
                "ids": [m["id"] for m in self.members], "identical": self.identical,
                "abspaths": [m["abspath"] for m in self.members]}


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return [sorted(members) for members in out.values() if len(members) > 1]


def find_duplicates(index, *, threshold: float | None = None, filter: Filter | None = None,
                    reference: Iterable[str] = (), against_reference: bool = False, min_size: int = 0,
                    on_progress: Callable[[int, int], None] | None = None) -> list[DupeGroup]:
    """Groups of duplicates in `index` (an open `Index`), largest first.

    `filter` and `min_size` (bytes) limit which images take part. `reference` folders (relative to
    the index root) hold originals: their files are always keepers and are never moved. With
    `against_reference`, only groups with a reference file are found, and reference files are not
    compared with each other: "which of these new photos do I already have?". `threshold` None is the
    index model's default (`Index.dupes_threshold`).
    """
    if threshold is None:
        threshold = index.dupes_threshold
    if not -1.0 <= threshold <= 1.0:
        raise ImgsimError("threshold must be between -1 and 1")
    if against_reference and not reference:
        raise ImgsimError("--against-reference needs at least one --reference folder")
    store, graph = index.store, index.graph
    where, params = (filter or Filter()).where()
    if min_size:
        where, params = f"({where}) AND size >= ?", [*params, int(min_size)]
    candidates = store.ids_where(where, params)
    ref_where, ref_params = Filter(folders=tuple(reference)).where() if reference else ("0", [])
    ref_ids = np.intersect1d(store.ids_where(ref_where, ref_params), candidates) if reference else np.empty(0, np.int64)
    if reference and not len(ref_ids):
        raise ImgsimError(f"no indexed images under the reference folder(s) {', '.join(reference)}")
    queries = np.setdiff1d(candidates, ref_ids) if against_reference else candidates
    targets = ref_ids if against_reference else candidates

    uf = _UnionFind()
    ref_set = set(ref_ids.tolist())
    for ids in store.identical_groups(where, params):
        if against_reference and not ref_set.intersection(ids):
            continue
        for other in ids[1:]:
            uf.union(ids[0], other)

    graph_ids = graph.ann.ids()
    queries = np.intersect1d(queries, graph_ids)
    allowed = None if len(targets) == len(graph_ids) else targets
    for start in range(0, len(queries), BATCH):
        batch = queries[start:start + BATCH]
        near, scores = graph.neighbours(batch, NEIGHBOURS, allowed=allowed, ef=DUPES_EF, min_score=threshold)
        rows, cols = np.nonzero((scores >= threshold) & (near >= 0))
        for a, b in zip(batch[rows].tolist(), near[rows, cols].tolist()):
            uf.union(a, b)
        if on_progress:
            on_progress(min(start + BATCH, len(queries)), len(queries))

    groups = []
    for ids in uf.groups():
        # Against the reference: a group needs a reference file and another one (byte-identical
        # reference files alone are grouped above, but are not what was asked).
        if against_reference and (not ref_set.intersection(ids) or ref_set.issuperset(ids)):
            continue
        groups.append(_group(index, ids, ref_set))
    groups.sort(key=lambda g: (-len(g.members), g.keeper["path"]))
    return groups


def _group(index, ids: list[int], reference: set[int]) -> DupeGroup:
    rows = {r["id"]: r for r in index.images_by_id(ids)}
    members = [rows[i] for i in ids if i in rows]

    def keeper_rank(row: dict):
        return (row["id"] not in reference, -(row["width"] * row["height"]), -row["size"], row["mtime_ns"], row["path"])

    members.sort(key=keeper_rank)
    keeper = members[0]
    found, vectors = index.graph.vectors([m["id"] for m in members])
    usable = ~damaged_rows(vectors)  # a vector damaged in the file scores nothing
    found, vectors = found[usable], vectors[usable]
    # Scored against the keeper's vector: its own, else a byte-identical copy's (the same picture).
    same_bytes = {m["id"] for m in members if m["sha256"] == keeper["sha256"]}
    anchor = next((n for n, i in enumerate(found.tolist()) if i in same_bytes), 0)
    scores = dict(zip(found.tolist(), index.graph.score_against(vectors[anchor], vectors).tolist())) if len(found) else {}
    by_bytes = {}  # a member whose own vector is damaged: its byte-identical copy's score
    for m in members:
        if m["id"] in scores:
            by_bytes.setdefault(m["sha256"], scores[m["id"]])
    listed = [(m, m["sha256"] == keeper["sha256"]) for m in members]
    listed = [(m, same, 1.0 if same else float(scores.get(m["id"], by_bytes.get(m["sha256"], 0.0))))
              for m, same in listed]
    # The keeper, then the others closest to it first: byte-identical copies, then by score.
    listed[1:] = sorted(listed[1:], key=lambda item: (not item[1], -item[2], item[0]["path"]))
    return DupeGroup(keeper, [m for m, _, _ in listed], [score for _, _, score in listed],
                     [same for _, same, _ in listed])


@dataclass(frozen=True)
class Move:
    source: Path
    destination: Path


def plan_moves(index, groups: list[DupeGroup], destination: str | os.PathLike,
               reference: Iterable[str] = ()) -> list[Move]:
    """Where each non-keeper would go: DESTINATION/its path relative to the index root. Files in
    reference folders never move. Refuses a destination inside the indexed folder."""
    dest = Path(os.path.expanduser(os.fspath(destination))).resolve()
    root = index.root
    if root is not None and (dest == root or root in dest.parents):
        raise ImgsimError(f"--move-to {destination} is inside the indexed folder {root}: the moved files would "
                          f"be indexed again; choose a folder outside it")
    ref = Filter(folders=tuple(reference)).folders
    moves = []
    for group in groups:
        for member in group.members[1:]:
            path = member["path"]
            if any(path == f or path.startswith(f + "/") or f == "" for f in ref):
                continue
            relative = Path(path) if not Path(path).is_absolute() else Path(*Path(path).parts[1:])
            moves.append(Move(Path(member["abspath"]), dest / relative))
    return moves


def move_duplicates(index, moves: list[Move], on_move: Callable[[Move, str | None], None] | None = None) -> int:
    """Move files as planned: never over an existing file, never deleting anything. The moved
    files' entries leave the index (they are no longer under its folder). Returns how many moved."""
    moved_paths = []
    for move in moves:
        problem = None
        if not move.source.is_file():
            problem = "no longer there"
        elif move.destination.exists() or move.destination.is_symlink():
            problem = f"{move.destination} already exists"
        else:
            try:
                move.destination.parent.mkdir(parents=True, exist_ok=True)
                _move_no_overwrite(move.source, move.destination)
                moved_paths.append(move.source)
            except OSError as e:
                problem = e.strerror or str(e)
        if on_move:
            on_move(move, problem)
    if moved_paths:
        index.forget_files(moved_paths)
    return len(moved_paths)


def _move_no_overwrite(source: Path, destination: Path) -> None:
    """Move a file; the destination must not exist (checked atomically where the OS allows)."""
    try:
        os.link(source, destination)  # fails if destination exists: no race can make it overwrite
    except FileExistsError:
        raise
    except OSError:  # another file system, or no hard links: copy, then remove the source
        with open(source, "rb") as src, open(destination, "xb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copystat(source, destination)
    os.unlink(source)
