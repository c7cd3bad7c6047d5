"""An index read for export: every column of its `images` table (found by introspection, so columns
added by later migrations flow into every export unchanged), its labels when a `labels` table of
(image_id, label) exists, and its vectors, streamed in id order in batches of bounded size.

`Selection` is the one place that restricts what an export covers: a set of image ids, or an SQL
condition on the `images` table with its parameters (what imgsim's search filters build). Both the
Parquet and the Qdrant export take one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import IndexCorruptError
from ..store import Store, blob_size, blobs_to_matrix

SKIPPED_COLUMNS = ("id",)
"""Columns of `images` that are not metadata (the id travels separately)."""


@dataclass(frozen=True)
class Selection:
    """Which images an export covers: all of them by default. `ids` keeps only those ids; `where` is an
    SQL condition on the `images` table (columns may be written `images.col`) whose values are in
    `params`, never spliced into the text. Both may be given; an image must then pass both."""

    ids: Sequence[int] | None = None
    where: str | None = None
    params: Sequence = ()

    def sql(self) -> tuple[str, list]:
        """(" AND (...)", params) to append to a WHERE clause on `images`."""
        if not self.where:
            return "", []
        return f" AND ({self.where})", list(self.params)


ALL = Selection()


@dataclass(frozen=True)
class Column:
    """A metadata column of the `images` table and its SQLite type affinity: integer, real, text, blob
    or numeric (https://sqlite.org/datatype3.html, section 3.1)."""

    name: str
    affinity: str


@dataclass
class Batch:
    """Consecutive images in id order: ids, metadata values per column (paths as stored: text, or raw
    bytes for a name that is not UTF-8), labels per image, and vectors (n, dim) when asked for."""

    ids: np.ndarray
    values: dict[str, list] = field(default_factory=dict)
    labels: list[list[str]] = field(default_factory=list)
    vectors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def affinity(declared: str) -> str:
    t = (declared or "").upper()
    if "INT" in t:
        return "integer"
    if any(word in t for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if not t or "BLOB" in t:
        return "blob"
    if any(word in t for word in ("REAL", "FLOA", "DOUB")):
        return "real"
    return "numeric"


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Source:
    """Reads one open index's store. Use `snapshot()` around a whole export so that it sees one
    consistent state even while a writer commits batches (SQLite keeps a read transaction's view)."""

    def __init__(self, store: Store):
        self.store = store
        self.manifest = store.manifest()
        self.dim = int(self.manifest["dim"])
        conn = store.conn
        self.columns = [Column(row[1], affinity(row[2])) for row in conn.execute("PRAGMA table_info(images)")
                        if row[1] not in SKIPPED_COLUMNS]
        label_columns = {row[1] for row in conn.execute("PRAGMA table_info(labels)")}
        self.has_labels = {"image_id", "label"} <= label_columns
        self._select = ", ".join(f"images.{quoted(c.name)}" for c in self.columns)

    @contextmanager
    def snapshot(self):
        conn = self.store.conn
        if conn.in_transaction:  # already inside one (the caller's): its view is the snapshot
            yield self
            return
        conn.execute("BEGIN")
        try:
            yield self
        finally:
            conn.execute("COMMIT")

    def count(self, selection: Selection = ALL) -> int:
        if selection.ids is not None:
            return sum(len(b) for b in self.batches(selection, with_vectors=False))
        where, params = selection.sql()
        return self.store.conn.execute(f"SELECT count(*) FROM images WHERE 1{where}", params).fetchone()[0]

    def batches(self, selection: Selection = ALL, *, batch_size: int = 4096, with_vectors: bool = True,
                after_id: int = 0) -> Iterator[Batch]:
        """The selected images with id > `after_id`, in id order, `batch_size` at a time."""
        if selection.ids is not None:
            ids = np.unique(np.asarray(list(selection.ids), dtype=np.int64))
            ids = ids[ids > after_id]
            for start in range(0, len(ids), batch_size):
                chunk = [int(i) for i in ids[start:start + batch_size]]
                yield from self._query(f"images.id IN ({','.join('?' * len(chunk))})", chunk, selection,
                                       with_vectors, None)
            return
        last = after_id
        while True:
            batch = next(self._query("images.id > ?", [last], selection, with_vectors, batch_size), None)
            if batch is None:
                return
            yield batch
            last = int(batch.ids[-1])

    def _query(self, condition: str, params: list, selection: Selection, with_vectors: bool,
               limit: int | None) -> Iterator[Batch]:
        extra, extra_params = selection.sql()
        vector = ", vectors.vector" if with_vectors else ""
        join = " JOIN vectors ON vectors.id = images.id" if with_vectors else ""
        sql = (f"SELECT images.id, {self._select}{vector} FROM images{join} WHERE {condition}{extra} "
               f"ORDER BY images.id" + (f" LIMIT {int(limit)}" if limit else ""))
        rows = self.store.conn.execute(sql, params + extra_params).fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        batch = Batch(ids)
        for i, column in enumerate(self.columns, start=1):
            batch.values[column.name] = [r[i] for r in rows]
        batch.labels = self._labels(ids)
        if with_vectors:
            blobs = [r[-1] for r in rows]
            size = blob_size(self.dim)
            bad = next((int(i) for i, b in zip(ids, blobs) if not isinstance(b, bytes) or len(b) != size), None)
            if bad is not None:
                raise IndexCorruptError(f"{self.store.path}: the vector of image {bad} is not {self.dim} values")
            batch.vectors = blobs_to_matrix(blobs, self.dim)
        yield batch

    def _labels(self, ids: np.ndarray) -> list[list[str]]:
        found: dict[int, list[str]] = {}
        if self.has_labels and len(ids):
            lo, hi = int(ids[0]), int(ids[-1])
            for image_id, label in self.store.conn.execute(
                    "SELECT image_id, label FROM labels WHERE image_id BETWEEN ? AND ? ORDER BY image_id, label",
                    (lo, hi)):
                found.setdefault(image_id, []).append(str(label))
        return [found.get(int(i), []) for i in ids]

    def id_fingerprints(self, selection: Selection = ALL, batch_size: int = 4096) -> Iterator[tuple[int, str]]:
        """(id, fingerprint of its metadata and labels) for every selected image, in id order: what a
        sync compares with what it exported last time. Vectors are not read: an id's vector never
        changes (a changed file gets a new id)."""
        for batch in self.batches(selection, batch_size=batch_size, with_vectors=False):
            yield from zip(batch.ids.tolist(), self.fingerprints(batch))

    def fingerprints(self, batch: Batch) -> list[str]:
        columns = [batch.values[c.name] for c in self.columns]
        out = []
        for row_no in range(len(batch)):
            text = json.dumps([[col[row_no] for col in columns], batch.labels[row_no]], default=_jsonable,
                              separators=(",", ":"))
            out.append(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest())
        return out


def text_of(value) -> str | None:
    """A stored value as display text: raw bytes (a path that is not UTF-8) get U+FFFD."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _jsonable(value):
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
