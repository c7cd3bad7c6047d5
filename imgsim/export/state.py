"""What an index last exported where, kept in the index itself (tables made by store.py's migration
004_export_state), so that the next export sends only the difference and a killed one resumes.

A point is recorded *before* it is written to the target, with no fingerprint ("pending"), and gets
its fingerprint once the target confirmed the write. So the record never claims more than the
target holds, and a pending id is either written again (if the image is still there) or deleted
from the target (if it is gone): whatever moment an export died at, the next run ends consistent.

The export centre: from 200 images on, imgsim scores by cosine around the collection's mean, which
moves a little with every change. A target that must rank as imgsim does holds vectors centred on
one frozen mean (`export_centres`); it is renewed (and every point sent again) only when the index's
mean has drifted from it by more than a tolerance, so that small changes stay small syncs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ImgsimError
from ..store import Store

DEFAULT_RECENTRE_ABOVE = 0.02
"""Renew the export centre when it is this far from the index's mean, relative to the spread of the
unit vectors around that mean (sqrt(1 - |mean|^2), their root-mean-square distance from it)."""


@dataclass(frozen=True)
class Target:
    id: int
    centre_version: int | None


def centre_drift(new: np.ndarray, old: np.ndarray) -> float:
    spread = float(np.sqrt(max(1e-12, 1.0 - float(np.dot(new, new)))))
    return float(np.linalg.norm(new - old)) / spread


class SyncState:
    def __init__(self, store: Store):
        self.store = store
        self.conn = store.conn
        tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.available = {"export_centres", "export_targets", "export_points"} <= tables

    def _require(self) -> None:
        if not self.available:
            raise ImgsimError(f"{self.store.path} uses an older format: open it once for writing "
                              f"(e.g. `imgsim index`) to upgrade it")

    # -- the export centre ----------------------------------------------------------------------
    def latest_centre(self) -> tuple[int, np.ndarray | None] | None:
        if not self.available:
            return None
        row = self.conn.execute("SELECT version, centre FROM export_centres ORDER BY version DESC LIMIT 1").fetchone()
        if row is None:
            return None
        centre = None if row[1] is None else np.asarray(json.loads(row[1]), dtype=np.float32)
        return row[0], centre

    def export_centre(self, current: np.ndarray | None, tolerance: float,
                      force: bool = False) -> tuple[int, np.ndarray | None, bool]:
        """(version, centre) to export with, renewed to `current` if needed; the bool says an earlier
        centre was replaced (every exported point must then be sent again)."""
        self._require()
        latest = self.latest_centre()
        if latest is not None and not force:
            version, centre = latest
            if current is None and centre is None:
                return version, None, False
            if current is not None and centre is not None and len(centre) == len(current) \
                    and centre_drift(current, centre) <= tolerance:
                return version, centre, False
        value = None if current is None else json.dumps([float(v) for v in current])
        with self.store.transaction():
            version = self.conn.execute("INSERT INTO export_centres (centre, created) VALUES (?, ?)",
                                        (value, time.time())).lastrowid
        return version, current, latest is not None

    # -- targets --------------------------------------------------------------------------------
    def target(self, kind: str, location: str, collection: str) -> Target:
        self._require()
        with self.store.transaction():
            self.conn.execute("INSERT OR IGNORE INTO export_targets (kind, location, collection, created) "
                              "VALUES (?, ?, ?, ?)", (kind, location, collection, time.time()))
        row = self.conn.execute("SELECT id, centre_version FROM export_targets WHERE kind = ? AND location = ? "
                                "AND collection = ?", (kind, location, collection)).fetchone()
        return Target(row[0], row[1])

    def set_centre_version(self, target: int, version: int) -> None:
        """Every point must be sent again: forget their fingerprints, keep their ids (they are there)."""
        with self.store.transaction():
            self.conn.execute("UPDATE export_points SET fingerprint = NULL WHERE target = ?", (target,))
            self.conn.execute("UPDATE export_targets SET centre_version = ? WHERE id = ?", (version, target))

    def finish(self, target: int) -> None:
        with self.store.transaction():
            self.conn.execute("UPDATE export_targets SET finished = ? WHERE id = ?", (time.time(), target))

    def reset(self, target: int) -> None:
        """The target lost everything (its collection was deleted or recreated)."""
        with self.store.transaction():
            self.conn.execute("DELETE FROM export_points WHERE target = ?", (target,))
            self.conn.execute("UPDATE export_targets SET centre_version = NULL WHERE id = ?", (target,))

    # -- points ---------------------------------------------------------------------------------
    def count(self, target: int, confirmed: bool = False) -> int:
        """Points recorded for `target`; with `confirmed`, only those the target acknowledged."""
        extra = " AND fingerprint IS NOT NULL" if confirmed else ""
        return self.conn.execute(f"SELECT count(*) FROM export_points WHERE target = ?{extra}",
                                 (target,)).fetchone()[0]

    def exported(self, target: int, chunk: int = 8192) -> Iterator[tuple[int, str | None]]:
        """(image id, fingerprint or None if pending) of every point recorded for `target`, in id order."""
        last = 0
        while True:
            rows = self.conn.execute("SELECT image_id, fingerprint FROM export_points WHERE target = ? "
                                     "AND image_id > ? ORDER BY image_id LIMIT ?", (target, last, chunk)).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def mark_pending(self, target: int, ids: Iterable[int]) -> None:
        with self.store.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO export_points (target, image_id, fingerprint) "
                                  "VALUES (?, ?, NULL)", [(target, int(i)) for i in ids])

    def confirm(self, target: int, fingerprints: Iterable[tuple[int, str]]) -> None:
        with self.store.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO export_points (target, image_id, fingerprint) "
                                  "VALUES (?, ?, ?)", [(target, int(i), fp) for i, fp in fingerprints])

    def forget(self, target: int, ids: Iterable[int]) -> None:
        with self.store.transaction():
            self.conn.executemany("DELETE FROM export_points WHERE target = ? AND image_id = ?",
                                  [(target, int(i)) for i in ids])


def diff(current: Iterator[tuple[int, str]], exported: Iterator[tuple[int, str | None]]) -> tuple[list[int], list[int], int]:
    """Merge two id-ordered streams: (ids to write, ids to delete, number unchanged)."""
    write: list[int] = []
    delete: list[int] = []
    unchanged = 0
    a = next(current, None)
    b = next(exported, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            write.append(a[0])
            a = next(current, None)
        elif a is None or b[0] < a[0]:
            delete.append(b[0])
            b = next(exported, None)
        else:
            if a[1] == b[1]:
                unchanged += 1
            else:
                write.append(a[0])
            a = next(current, None)
            b = next(exported, None)
    return write, delete, unchanged


def query_centre(store: Store) -> np.ndarray | None:
    """The mean a query must be centred on to match this index's exports: the export centre if the
    index was exported, else its own current mean (what the next export will freeze)."""
    latest = SyncState(store).latest_centre()
    if latest is not None:
        return latest[1]
    center = store.manifest().get("center")
    return None if center is None else np.asarray(center, dtype=np.float32)


def query_vector(index, image) -> np.ndarray:
    """The vector to query this index's exports with: `image` (a file, a PIL image, or a vector from
    `Index.embed`) embedded as the index embeds, then centred as the exported points were."""
    from ..models import normalize

    vector = image if isinstance(image, np.ndarray) else index.embed(image)
    centre = query_centre(index.store)
    if centre is None:
        return np.asarray(vector, dtype=np.float32)
    return normalize((np.asarray(vector, np.float32) - centre)[None])[0]
