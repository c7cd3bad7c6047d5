"""The SQLite half of an index: image rows, their vectors, errors seen while indexing, and the manifest.

SQLite is the source of truth; the FAISS file is derived from the `vectors` table. Row ids come from
AUTOINCREMENT, so an id is never reused: an id that FAISS still holds after its row was removed can be
recognised as dead. Schema changes are named migrations (sqlite-utils `Migrations`), applied in order and recorded.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlite_utils

from .errors import IndexCorruptError, IndexNotFoundError, ReadOnlyIndexError

APPLICATION_ID = 0x696D6773  # "imgs": marks the SQLite file as an imgsim index
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImageRow:
    """What the index knows about one image file."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    format: str
    added: float


@dataclass(frozen=True)
class NewImage:
    """An embedded image waiting to be written."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    format: str
    vector: np.ndarray


MIGRATIONS = sqlite_utils.Migrations("imgsim")


@MIGRATIONS(name="001_initial")
def _initial(db: sqlite_utils.Database) -> None:
    db.execute("""
        CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            format TEXT NOT NULL,
            added REAL NOT NULL
        )""")
    db.execute("CREATE INDEX images_sha256 ON images(sha256)")
    db.execute("""
        CREATE TABLE vectors (
            id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
            vector BLOB NOT NULL
        )""")
    db["errors"].create({"path": str, "reason": str, "seen": float}, pk="path")
    db["manifest"].create({"key": str, "value": str}, pk="key")


class Store:
    """An open SQLite index file. Writes go through `transaction()` so each batch is atomic."""

    def __init__(self, conn: sqlite3.Connection, path: Path, read_only: bool):
        self.path = path
        self.read_only = read_only
        self.db = sqlite_utils.Database(conn)
        self.conn = conn

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path) -> Store:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        store = cls(conn, path, read_only=False)
        store.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        store._configure()
        store.migrate()
        return store

    @classmethod
    def open(cls, path: Path, read_only: bool = False) -> Store:
        if not path.is_file():
            raise IndexNotFoundError(f"no index at {path}")
        try:
            if read_only:
                # immutable: the file may sit in a read-only folder where SQLite cannot make its -shm file.
                immutable = "&immutable=1" if not _writable_dir(path.parent) else ""
                uri = f"{path.resolve().as_uri()}?mode=ro{immutable}"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            store = cls(conn, path, read_only)
            store._check_identity()
            store._configure()
            if not read_only:
                store.migrate()
            elif store._pending_migrations():
                raise IndexCorruptError(f"{path} uses an older format: open it once for writing to upgrade it")
            return store
        except sqlite3.DatabaseError as e:
            raise IndexCorruptError(f"{path} is not a readable imgsim index ({e})") from None

    def _check_identity(self) -> None:
        app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise IndexCorruptError(f"{self.path} is not an imgsim index")

    def _configure(self) -> None:
        self.db.execute("PRAGMA busy_timeout = 10000")
        self.db.execute("PRAGMA foreign_keys = ON")
        if not self.read_only:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")

    def _pending_migrations(self) -> list[str]:
        return [m.name for m in MIGRATIONS.pending(self.db)]

    def migrate(self) -> None:
        if self._pending_migrations():
            MIGRATIONS.apply(self.db)

    def close(self) -> None:
        if not self.read_only:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass  # another connection is reading; the WAL is checkpointed later
        self.conn.close()

    # -- transactions and the manifest -----------------------------------------------------------
    def transaction(self):
        """A context manager: everything inside commits together or not at all."""
        if self.read_only:
            raise ReadOnlyIndexError(f"{self.path} is open read-only")
        return self.db.atomic()

    def manifest(self) -> dict:
        return {row["key"]: json.loads(row["value"]) for row in self.db["manifest"].rows}

    def set_manifest(self, **values) -> None:
        """Update manifest keys; call inside a transaction to make it part of a batch."""
        rows = [{"key": key, "value": json.dumps(value)} for key, value in values.items()]
        self.db["manifest"].upsert_all(rows, pk="key")

    # -- images ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM images").fetchone()[0]

    def max_id(self) -> int:
        return self.db.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0]

    def all_rows(self) -> Iterator[ImageRow]:
        for row in self.db.execute(f"SELECT {_COLUMNS} FROM images ORDER BY id"):
            yield ImageRow(*row)

    def rows_by_id(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(i) for i in ids]
        found: dict[int, ImageRow] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})", chunk):
                found[row[0]] = ImageRow(*row)
        return found

    def ids(self) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM images ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def insert(self, images: list[NewImage]) -> list[int]:
        """Insert images and their vectors (inside the caller's transaction); returns the new ids."""
        now = time.time()
        ids = []
        for image in images:
            cursor = self.db.execute(
                "INSERT INTO images (path, size, mtime_ns, sha256, width, height, format, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (image.path, image.size, image.mtime_ns, image.sha256, image.width, image.height, image.format, now),
            )
            ids.append(cursor.lastrowid)
            self.db.execute("INSERT INTO vectors (id, vector) VALUES (?, ?)", (cursor.lastrowid, _to_blob(image.vector)))
            self.db.execute("DELETE FROM errors WHERE path = ?", (image.path,))
        return ids

    def update_file(self, row_id: int, path: str, size: int, mtime_ns: int) -> None:
        """Record a file's new path or stat (a move, or a touch that left its content alone)."""
        self.db.execute("UPDATE images SET path = ?, size = ?, mtime_ns = ? WHERE id = ?", (path, size, mtime_ns, row_id))

    def delete(self, ids: Iterable[int]) -> None:
        for row_id in ids:
            self.db.execute("DELETE FROM vectors WHERE id = ?", (int(row_id),))
            self.db.execute("DELETE FROM images WHERE id = ?", (int(row_id),))

    # -- vectors ---------------------------------------------------------------------------------
    def vectors(self, after_id: int = 0, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, matrix) chunks of the stored vectors with id > `after_id`, in id order."""
        last = after_id
        while True:
            rows = self.db.execute(
                "SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, np.stack([_from_blob(r[1]) for r in rows])
            last = int(ids[-1])

    def vector(self, row_id: int) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM vectors WHERE id = ?", (row_id,)).fetchone()
        return None if row is None else _from_blob(row[0])

    # -- errors ----------------------------------------------------------------------------------
    def record_errors(self, failures: list[tuple[str, str]]) -> None:
        now = time.time()
        self.db["errors"].upsert_all(
            [{"path": path, "reason": reason, "seen": now} for path, reason in failures], pk="path")

    def errors(self) -> list[tuple[str, str, float]]:
        return [(r["path"], r["reason"], r["seen"]) for r in self.db["errors"].rows_where(order_by="path")]


_COLUMNS = "id, path, size, mtime_ns, sha256, width, height, format, added"


def _to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def _from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


def _writable_dir(path: Path) -> bool:
    return os.access(path, os.W_OK)
