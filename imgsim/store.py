"""The SQLite half of an index: image rows, their vectors, errors seen while indexing, and the manifest.

SQLite is the source of truth; the FAISS file is derived from the `vectors` table. Row ids come from
AUTOINCREMENT, so an id is never reused: an id that FAISS still holds after its row was removed can be
recognised as dead. Schema changes are named migrations (sqlite-utils `Migrations`), applied in order and recorded.

Reading needs only the standard `sqlite3` module: sqlite-utils (which takes ~0.1 s to import, and
scans every installed package for plugins when a `Database` is made) is loaded by writers alone, so
that a cold `imgsim search` does not pay for it.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import crop_codes
from .errors import IndexCorruptError, IndexNotFoundError, ReadOnlyIndexError

if TYPE_CHECKING:
    import sqlite_utils

APPLICATION_ID = 0x696D6773  # "imgs": marks the SQLite file as an imgsim index


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
    folder: str = ""
    """The folder part of `path` ("" for a file directly in the root)."""
    name: str = ""
    taken: str | None = None
    """EXIF capture time as the camera wrote it (local time, ISO 8601), if the file has one."""
    camera: str | None = None
    date: str = ""
    """`taken`, else the file's mtime in local time (ISO 8601): what --since and --until compare."""

    def to_dict(self) -> dict:
        return asdict(self)


class ResultRow(NamedTuple):
    """What a search result shows of an image: columns of `images` (by name), then its labels."""

    path: str
    width: int
    height: int
    format: str
    size: int
    date: str
    labels: tuple[str, ...]


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
    taken: str | None = None
    camera: str | None = None
    crops: tuple[bytes, ...] | None = None
    """The index's crop views (`Preprocess.crop_views`) as stored (`crop_codes.encode`); None without."""


MIGRATION_SET = "imgsim"
"""The name sqlite-utils records the migrations under, in its `_sqlite_migrations` table."""
MIGRATIONS_TABLE = "_sqlite_migrations"
_MIGRATION_STEPS: list[tuple[str, object]] = []


def _migration(name: str):
    """Register a migration step, in order (handed to sqlite-utils `Migrations` by `migrations()`)."""

    def register(fn):
        _MIGRATION_STEPS.append((name, fn))
        return fn

    return register


@_migration("001_initial")
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


@_migration("002_metadata_and_labels")
def _metadata(db: sqlite_utils.Database) -> None:
    """Columns the filters read (folder, file name, EXIF capture time and camera, a sortable date),
    and labels. Existing rows get folder, name and date from what is stored; EXIF arrives when a file
    is next embedded."""
    for column, kind in (("folder", "TEXT NOT NULL DEFAULT ''"), ("name", "TEXT NOT NULL DEFAULT ''"),
                         ("taken", "TEXT"), ("camera", "TEXT"), ("date", "TEXT NOT NULL DEFAULT ''")):
        db.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")
    rows = db.execute("SELECT id, path, mtime_ns FROM images").fetchall()
    db.conn.executemany("UPDATE images SET folder = ?, name = ?, date = ? WHERE id = ?",
                        [(*_split(_from_db(path)), local_date(mtime_ns), row_id) for row_id, path, mtime_ns in rows])
    for column in ("folder", "format", "date"):
        db.execute(f"CREATE INDEX images_{column} ON images({column})")
    db.execute("""
        CREATE TABLE labels (
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            PRIMARY KEY (image_id, label)
        )""")
    db.execute("CREATE INDEX labels_label ON labels(label)")
    db.execute("UPDATE manifest SET value = '2' WHERE key = 'format_version'")  # older imgsims leave it alone


@_migration("003_error_file_stat")
def _error_file_stat(db: sqlite_utils.Database) -> None:
    """The size, mtime and ctime of a file that failed, so that the next run can leave it alone
    while it is unchanged. Older rows have none and are tried once more."""
    for column in ("size", "mtime_ns", "ctime_ns"):
        db.execute(f"ALTER TABLE errors ADD COLUMN {column} INTEGER")


@_migration("004_export_state")
def _export_state(db: sqlite_utils.Database) -> None:
    """What was last exported where (imgsim.export.state): one row per export target, and per target
    the images it holds with a fingerprint of their metadata (NULL: written, not yet confirmed)."""
    db.execute("""
        CREATE TABLE export_centres (
            version INTEGER PRIMARY KEY AUTOINCREMENT,
            centre TEXT,
            created REAL NOT NULL
        )""")
    db.execute("""
        CREATE TABLE export_targets (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            location TEXT NOT NULL,
            collection TEXT NOT NULL,
            centre_version INTEGER,
            created REAL NOT NULL,
            finished REAL,
            UNIQUE (kind, location, collection)
        )""")
    db.execute("""
        CREATE TABLE export_points (
            target INTEGER NOT NULL REFERENCES export_targets(id) ON DELETE CASCADE,
            image_id INTEGER NOT NULL,
            fingerprint TEXT,
            PRIMARY KEY (target, image_id)
        ) WITHOUT ROWID""")


@_migration("005_float16_vectors_and_removed_ids")
def _float16(db: sqlite_utils.Database) -> None:
    """Vectors are kept once, as float16 (half the bytes of float32; cosine scores move by about
    1e-4, far below any difference that matters, see README "How fast is it"): the FAISS graph
    holds only 8-bit codes and re-scores its candidates from these. The graph is rebuilt in that
    layout (its checksums are cleared). Ids of removed rows are kept in `removed` by triggers, so
    the graph's dead ids are known at open without comparing every id."""
    dim_row = db.execute("SELECT value FROM manifest WHERE key = 'dim'").fetchone()
    dim = json.loads(dim_row[0]) if dim_row else None
    if isinstance(dim, int) and dim > 0:
        last = 0
        while True:
            rows = db.execute("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT 4096", (last,)).fetchall()
            if not rows:
                break
            db.conn.executemany("UPDATE vectors SET vector = ? WHERE id = ?",
                                [(_to_blob(np.frombuffer(blob, "<f4")), row_id) for row_id, blob in rows
                                 if isinstance(blob, bytes) and len(blob) == 4 * dim])
            last = rows[-1][0]
    db.execute("CREATE TABLE removed (id INTEGER PRIMARY KEY)")
    for table in ("images", "vectors"):
        db.execute(f"CREATE TRIGGER {table}_removed AFTER DELETE ON {table} "
                   f"BEGIN INSERT OR IGNORE INTO removed (id) VALUES (old.id); END")
    db.execute("DELETE FROM manifest WHERE key IN ('faiss_sha256', 'faiss_previous_sha256')")
    db.execute("UPDATE manifest SET value = '3' WHERE key = 'format_version'")


@_migration("006_crop_vectors")
def _crop_vectors(db: sqlite_utils.Database) -> None:
    """The vectors of each image's crop views (`Preprocess.crop_views`, `imgsim index --centre-view`),
    float16, one row per view, keyed `image id * CROP_SLOTS + view` so that a page holds as many as
    `vectors` does (one blob of all of an image's views took a whole 8 KB page alone at 1280-d) and
    a search reads its best candidates' ones by key (crops.py); never in the graph. They go with
    their image by a trigger. Indexes without crop views leave the table empty."""
    db.execute("CREATE TABLE crop_vectors (id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
    db.execute(f"CREATE TRIGGER images_crop_vectors AFTER DELETE ON images BEGIN DELETE FROM crop_vectors "
               f"WHERE id >= old.id * {CROP_SLOTS} AND id < (old.id + 1) * {CROP_SLOTS}; END")


WRITER_ONLY_MIGRATIONS = frozenset({"003_error_file_stat", "004_export_state", "006_crop_vectors"})
"""Migrations that only writers need: a read-only open of a file without them is not refused."""

MIGRATION_NAMES = tuple(name for name, _ in _MIGRATION_STEPS)


@functools.cache
def migrations() -> sqlite_utils.Migrations:
    """The migrations as a sqlite-utils `Migrations` set (importing sqlite-utils: writers only)."""
    import sqlite_utils

    found = sqlite_utils.Migrations(MIGRATION_SET)
    for name, fn in _MIGRATION_STEPS:
        found(name=name)(fn)
    return found


def _database(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """A sqlite-utils view of the connection, for writing. No sqlite-utils plugins are run on it: they
    could change imgsim's own connection, and finding them means scanning every installed package."""
    import sqlite_utils

    return sqlite_utils.Database(conn, execute_plugins=False)


class Store:
    """An open SQLite index file. Writes go through `transaction()` so each batch is atomic."""

    def __init__(self, conn: sqlite3.Connection, path: Path, read_only: bool):
        self.path = path
        self.read_only = read_only
        self.conn = conn
        self._db = None if read_only else _database(conn)
        self._probe = None

    @property
    def db(self) -> sqlite_utils.Database:
        """The connection through sqlite-utils (made on first use by a reader: reads use `conn`)."""
        if self._db is None:
            self._db = _database(self.conn)
        return self._db

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, dim: int | None = None) -> Store:
        """A new, empty index file; `dim` (the model's) chooses a page size that packs its vectors well."""
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        store = cls(conn, path, read_only=False)
        if dim:
            store.conn.execute(f"PRAGMA page_size = {page_size_for(dim)}")  # before the first table
        store.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
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
            elif set(store._pending_migrations()) - WRITER_ONLY_MIGRATIONS:
                raise IndexCorruptError(f"{path} uses an older format: open it once for writing to upgrade it")
            store._check_schema()
            return store
        except sqlite3.DatabaseError as e:
            raise IndexCorruptError(f"{path} is not a readable imgsim index ({e})") from None

    def _check_identity(self) -> None:
        app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise IndexCorruptError(f"{self.path} is not an imgsim index")

    def _check_schema(self) -> None:
        """Every table and column imgsim reads must be there: a crafted file may lack some."""
        for table, columns in _SCHEMA.items():
            found = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            if not columns <= found:
                raise IndexCorruptError(f"{self.path} is damaged: table {table} is missing or incomplete")

    def _configure(self) -> None:
        self.conn.execute("PRAGMA busy_timeout = 10000")
        self.conn.execute("PRAGMA foreign_keys = ON")
        # Read pages through a memory map rather than a read() call each: a search reads ~64 vectors
        # from pages all over the file (0.1 ms instead of 0.5-1 ms). SQLite caps the size it maps.
        self.conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        if not self.read_only:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")

    def _pending_migrations(self) -> list[str]:
        """The migrations not yet applied to the file, in order (read with plain SQL, as sqlite-utils
        `Migrations.pending` does: the names recorded for this set in its table)."""
        applied = {row[0] for row in self.conn.execute(
            f"SELECT name FROM [{MIGRATIONS_TABLE}] WHERE migration_set = ?", (MIGRATION_SET,))} \
            if self.has_table(MIGRATIONS_TABLE) else set()
        return [name for name in MIGRATION_NAMES if name not in applied]

    def has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (name,)).fetchone() is not None

    def migrate(self) -> None:
        if self._pending_migrations():
            migrations().apply(self.db)

    def writer_active(self) -> bool:
        """Whether another process has this index open for writing (see `lock.WriterProbe`)."""
        from .lock import WriterProbe

        if self._probe is None:
            self._probe = WriterProbe(self.path)
        return self._probe.active()

    def close(self) -> None:
        if not self.read_only:
            # Leave the file at rest in rollback-journal mode, so that read-only openers (a shipped
            # dataset, `imgsim search`) never need to create -wal/-shm files beside it. While a
            # reader is open this is refused at once, and the next writer's close tries again.
            try:
                self.conn.execute("PRAGMA busy_timeout = 0")
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.conn.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.DatabaseError:
                pass
        self.conn.close()
        if self._probe is not None:  # only now: closing it drops this process's locks on the file
            self._probe.close()

    # -- transactions and the manifest -----------------------------------------------------------
    def transaction(self):
        """A context manager: everything inside commits together or not at all."""
        if self.read_only:
            raise ReadOnlyIndexError(f"{self.path} is open read-only")
        return self.db.atomic()

    def manifest(self) -> dict:
        try:
            return {key: json.loads(value) for key, value in self.conn.execute("SELECT key, value FROM manifest")}
        except (ValueError, TypeError):
            raise IndexCorruptError(f"{self.path} has an invalid manifest") from None

    def set_manifest(self, **values) -> None:
        """Update manifest keys; call inside a transaction to make it part of a batch."""
        rows = [{"key": key, "value": json.dumps(value)} for key, value in values.items()]
        self.db["manifest"].upsert_all(rows, pk="key")

    # -- images ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.conn.execute("SELECT count(*) FROM images").fetchone()[0]

    def max_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0]

    def all_rows(self) -> Iterator[ImageRow]:
        for row in self.conn.execute(f"SELECT {_COLUMNS} FROM images ORDER BY id"):
            yield _image_row(row)

    def rows_by_id(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(i) for i in ids]
        found: dict[int, ImageRow] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})", chunk):
                found[row[0]] = _image_row(row)
        return found

    def ids(self) -> np.ndarray:
        rows = self.conn.execute("SELECT id FROM images ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def insert(self, images: list[NewImage], labels: Iterable[str] = ()) -> list[int]:
        """Insert images and their vectors (inside the caller's transaction); returns the new ids.
        Each image also gets `labels`."""
        now = time.time()
        ids = []
        labels = list(labels)
        for image in images:
            folder, name = _split(image.path)
            cursor = self.conn.execute(
                "INSERT INTO images (path, size, mtime_ns, sha256, width, height, format, added, folder, name, "
                "taken, camera, date) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_to_db(image.path), image.size, image.mtime_ns, image.sha256, image.width, image.height, image.format,
                 now, folder, name, image.taken, image.camera, image.taken or local_date(image.mtime_ns)),
            )
            ids.append(cursor.lastrowid)
            self.conn.execute("INSERT INTO vectors (id, vector) VALUES (?, ?)", (cursor.lastrowid, _to_blob(image.vector)))
            if image.crops is not None:
                # OR REPLACE: a stray row of a damaged file in this image's slots must not block it.
                self.conn.executemany("INSERT OR REPLACE INTO crop_vectors (id, vector) VALUES (?, ?)",
                                      [(crop_key(cursor.lastrowid, view), blob)
                                       for view, blob in enumerate(image.crops)])
            self.conn.execute("DELETE FROM errors WHERE path = ?", (_to_db(image.path),))
        if labels:
            self.add_labels(ids, labels)
        return ids

    def update_file(self, row_id: int, path: str, size: int, mtime_ns: int) -> None:
        """Record a file's new path or stat (a move, or a touch that left its content alone)."""
        folder, name = _split(path)
        self.conn.execute("UPDATE images SET path = ?, size = ?, mtime_ns = ?, folder = ?, name = ?, "
                        "date = coalesce(taken, ?) WHERE id = ?",
                        (_to_db(path), size, mtime_ns, folder, name, local_date(mtime_ns), row_id))

    def delete(self, ids: Iterable[int]) -> None:
        for row_id in ids:
            self.conn.execute("DELETE FROM vectors WHERE id = ?", (int(row_id),))
            self.conn.execute("DELETE FROM images WHERE id = ?", (int(row_id),))

    # -- filters and labels ----------------------------------------------------------------------
    def ids_where(self, where: str, params: list) -> np.ndarray:
        """Ids of the rows matching a WHERE fragment built by `filters.Filter` (values as parameters)."""
        rows = self.conn.execute(f"SELECT id FROM images WHERE {where} ORDER BY id", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def rows_where(self, where: str = "1", params: list = (), order: str = "path",
                   limit: int | None = None) -> Iterator[ImageRow]:
        order_by = {"path": "path", "id": "id", "date": "date, path", "size": "size DESC, path"}[order]
        sql = f"SELECT {_COLUMNS} FROM images WHERE {where} ORDER BY {order_by}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.conn.execute(sql, list(params)):
            yield _image_row(row)

    def identical_groups(self, where: str = "1", params: list = ()) -> Iterator[list[int]]:
        """Ids of rows sharing one sha256 (byte-identical files), one list per content, among matching rows."""
        sql = (f"SELECT group_concat(id) FROM (SELECT id, sha256 FROM images WHERE {where} ORDER BY id) "
               f"GROUP BY sha256 HAVING count(*) > 1")
        for (ids,) in self.conn.execute(sql, list(params)):
            yield [int(i) for i in ids.split(",")]

    def row_by_path(self, path: str) -> ImageRow | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE path = ?", (_to_db(path),)).fetchone()
        return _image_row(row) if row else None

    def add_labels(self, ids: Iterable[int], labels: Iterable[str]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO labels (image_id, label) VALUES (?, ?)",
                              [(int(i), label) for i in ids for label in labels])

    def remove_labels(self, ids: Iterable[int], labels: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM labels WHERE image_id = ? AND label = ?",
                              [(int(i), label) for i in ids for label in labels])

    def result_rows(self, ids: Iterable[int]) -> dict[int, ResultRow]:
        """The `ResultRow` of each id that exists, in one query (a search's results: one SQLite round
        trip, and no `ImageRow` built for each)."""
        ids = [int(i) for i in ids]
        found: dict[int, ResultRow] = {}
        columns = ", ".join(f"images.{c}" for c in ("id", *ResultRow._fields[:-1]))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for image_id, path, *rest, label in self.conn.execute(
                    f"SELECT {columns}, labels.label FROM images LEFT JOIN labels ON labels.image_id = images.id "
                    f"WHERE images.id IN ({marks}) ORDER BY images.id, labels.label", chunk):
                have = found.get(image_id)
                if have is None:
                    found[image_id] = ResultRow(_from_db(path), *rest, () if label is None else (label,))
                elif label is not None:
                    found[image_id] = have._replace(labels=have.labels + (label,))
        return found

    def labels_by_id(self, ids: Iterable[int]) -> dict[int, list[str]]:
        ids = [int(i) for i in ids]
        found: dict[int, list[str]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for image_id, label in self.conn.execute(
                    f"SELECT image_id, label FROM labels WHERE image_id IN ({marks}) ORDER BY label", chunk):
                found.setdefault(image_id, []).append(label)
        return found

    # -- vectors ---------------------------------------------------------------------------------
    def vectors(self, dim: int, after_id: int = 0, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, matrix) chunks of the stored `dim`-d vectors with id > `after_id`, in id order."""
        last = after_id
        while True:
            rows = self.conn.execute(
                "SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            bad = next((r[0] for r in rows if not isinstance(r[1], bytes) or len(r[1]) != VECTOR_BYTES * dim), None)
            if bad is not None:
                raise IndexCorruptError(f"{self.path}: the vector of image {bad} is not {dim} float16 values")
            yield ids, np.frombuffer(b"".join(r[1] for r in rows), "<f2").reshape(len(rows), dim).astype(np.float32)
            last = int(ids[-1])

    def vectors_by_id(self, ids: list[int], dim: int) -> dict[int, np.ndarray]:
        found, matrix = self.vector_matrix(ids, dim)
        return dict(zip(found.tolist(), matrix))

    def vector_matrix(self, ids, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(the ids that have a `dim`-d vector, their vectors as float32 rows), in the order given:
        one query per 4096 ids (the re-scoring of a search's candidates is one query)."""
        found, blobs = self.vector_bytes(ids, dim)
        return found, np.frombuffer(blobs, VECTOR_DTYPE).reshape(len(found), dim).astype(np.float32)

    def vector_bytes(self, ids, dim: int) -> tuple[np.ndarray, bytes]:
        """(the ids that have a `dim`-d vector, their float16 blobs joined), in the order given."""
        ids = np.asarray(ids, dtype=np.int64).tolist()
        found = self._blobs_by_key("vectors", ids)
        size = VECTOR_BYTES * dim
        keep = [i for i in ids if _is_blob(found.get(i), size)]
        return np.asarray(keep, np.int64), b"".join([found[i] for i in keep])

    def _blobs_by_key(self, table: str, keys: list[int]) -> dict[int, object]:
        """{id: value} of the rows of `table` (vectors, crop_vectors) with these ids, in as few queries
        as SQLite's limit on parameters allows (a search reads a few dozen: one)."""
        found: dict[int, object] = {}
        for start in range(0, len(keys), 4096):
            chunk = keys[start:start + 4096]
            found.update(self.conn.execute(f"SELECT id, vector FROM {table} WHERE id IN ({','.join('?' * len(chunk))})",
                                           chunk).fetchall())
        return found

    def crop_bytes(self, ids, views: int, size: int) -> tuple[np.ndarray, bytes]:
        """(the ids that have all `views` crop-view blobs of `size` bytes (`crop_codes.blob_size`),
        those blobs joined, each image's views in order), in the order given. An image with any of
        them missing or of another size (damaged) is left out: it is scored by its own vector alone."""
        ids = [i for i in np.asarray(ids, dtype=np.int64).tolist() if 0 <= i < MAX_CROP_IMAGE_ID]  # others: none
        keys = [i * CROP_SLOTS + view for i in ids for view in range(views)]  # `crop_key`, in range here
        try:
            found = self._blobs_by_key("crop_vectors", keys)
        except sqlite3.OperationalError as e:  # a file claiming crop views without their table
            raise IndexCorruptError(f"{self.path} is damaged: its crop views cannot be read ({e})") from None
        whole = [_is_blob(b, size) for b in map(found.get, keys)]
        keep, blobs = [], []
        for n, image_id in enumerate(ids):
            if all(whole[n * views:(n + 1) * views]):
                keep.append(image_id)
                blobs += [found[key] for key in keys[n * views:(n + 1) * views]]
        return np.asarray(keep, np.int64), b"".join(blobs)

    def all_crop_bytes(self, views: int, size: int) -> tuple[np.ndarray, bytes]:
        """As `crop_bytes` for every image with crop views, ids ascending: one pass over the table in
        key order (a smaller index's crop views are all scanned: `crop_scan.py`)."""
        try:
            rows = self.conn.execute("SELECT id, vector FROM crop_vectors ORDER BY id").fetchall()
        except sqlite3.OperationalError as e:  # a file claiming crop views without their table
            raise IndexCorruptError(f"{self.path} is damaged: its crop views cannot be read ({e})") from None
        keep, blobs, at = [], [], 0
        while at < len(rows):  # each image's views are consecutive keys: image id x CROP_SLOTS + view
            image_id = rows[at][0] // CROP_SLOTS
            mine = rows[at:at + views]
            if len(mine) == views and all(key == image_id * CROP_SLOTS + view and _is_blob(blob, size)
                                          for view, (key, blob) in enumerate(mine)):
                keep.append(image_id)
                blobs += [blob for _, blob in mine]
            at += 1
            while at < len(rows) and rows[at][0] // CROP_SLOTS == image_id:
                at += 1
        return np.asarray(keep, np.int64), b"".join(blobs)

    def crop_blobs(self, ids, views: int, size: int) -> dict[int, bytes]:
        """As `crop_bytes`, by id: each image's crop views joined."""
        found, blobs = self.crop_bytes(ids, views, size)
        step = views * size
        return {image_id: blobs[n * step:(n + 1) * step] for n, image_id in enumerate(found.tolist())}

    def ids_with_damaged_crop_views(self, views: int, dim: int, code: str, chunk: int = 2048) -> np.ndarray:
        """Ids of images without all `views` crop views of `dim` dimensions stored as `code` says,
        or with a damaged one (`crop_codes.damaged`), in an index with crop views."""
        bad = []
        last = -(1 << 63)
        while ids := [r[0] for r in self.conn.execute(
                "SELECT id FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, chunk))]:
            found, blobs = self.crop_bytes(ids, views, crop_codes.blob_size(code, dim))
            bad += sorted(set(ids) - set(found.tolist()))
            if len(found):  # judged as search and verify judge the images' own vectors
                hurt = crop_codes.damaged(code, blobs, len(found) * views, dim)
                bad += found[hurt.reshape(len(found), views).any(axis=1)].tolist()
            last = ids[-1]
        return np.array(sorted(bad), dtype=np.int64)

    def stray_crop_rows(self, views: int) -> int:
        """Crop-view rows that belong to no image's views (`views` per image; 0: an index without crop
        views, where every row is stray): only a damaged or crafted file has them."""
        return self.conn.execute(f"SELECT count(*) FROM crop_vectors WHERE {_STRAY_CROP_ROW}", (views,)).fetchone()[0]

    def delete_stray_crop_rows(self, views: int) -> int:
        with self.transaction():
            return self.conn.execute(f"DELETE FROM crop_vectors WHERE {_STRAY_CROP_ROW}", (views,)).rowcount

    def removed_ids(self) -> np.ndarray:
        """Ids of every row ever removed (ids are never reused): the graph may still hold some."""
        rows = self.conn.execute("SELECT id FROM removed ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    # -- consistency -----------------------------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """SQLite's own check of the file (one line, whatever it says: `verify --repair` cannot mend a
        damaged page), then rows without vectors and vectors without rows."""
        found = [line.strip() for row in self.conn.execute("PRAGMA quick_check").fetchall() if row[0] != "ok"
                 for line in str(row[0]).splitlines() if line.strip() and not line.startswith("***")]
        problems = []
        if found:
            problems.append(f"SQLite's own check finds {self.path.name} damaged ({len(found)} finding"
                            f"{'s' * (len(found) != 1)}, the first: {found[0]}); --repair cannot mend that: "
                            f"restore a copy of the index, or index the folder into a new one")
        orphans = self.conn.execute(
            "SELECT count(*) FROM vectors WHERE id NOT IN (SELECT id FROM images)").fetchone()[0]
        bare = self.conn.execute(
            "SELECT count(*) FROM images WHERE id NOT IN (SELECT id FROM vectors)").fetchone()[0]
        if orphans:
            problems.append(f"{orphans} vectors have no image row")
        if bare:
            problems.append(f"{bare} image rows have no vector")
        return problems

    def ids_with_wrong_size_vectors(self, dim: int) -> np.ndarray:
        """Ids whose stored vector is not a blob of `dim` float16 values (damaged in the file)."""
        rows = self.conn.execute("SELECT id FROM vectors WHERE typeof(vector) != 'blob' OR length(vector) != ?",
                                 (VECTOR_BYTES * dim,)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def delete_unpaired(self) -> int:
        """Remove vectors without rows and rows without vectors (re-indexing embeds those files again)."""
        with self.transaction():
            gone = self.conn.execute("DELETE FROM vectors WHERE id NOT IN (SELECT id FROM images)").rowcount
            gone += self.conn.execute("DELETE FROM images WHERE id NOT IN (SELECT id FROM vectors)").rowcount
        return gone

    # -- errors ----------------------------------------------------------------------------------
    def record_errors(self, failures: list[tuple[str, str]],
                      stats: Iterable[tuple[int, int, int] | None] | None = None) -> None:
        """Keep (path, reason) failures; `stats` holds each file's (size, mtime_ns, ctime_ns), or None
        where there is none (a broken link, a folder), for `failed_file_stats`."""
        now = time.time()
        stats = [None] * len(failures) if stats is None else list(stats)
        self.conn.executemany(
            "INSERT OR REPLACE INTO errors (path, reason, seen, size, mtime_ns, ctime_ns) VALUES (?, ?, ?, ?, ?, ?)",
            [(_to_db(path), reason, now, *(stat or (None, None, None)))
             for (path, reason), stat in zip(failures, stats)])

    def failed_file_stats(self) -> dict[str, tuple[int, int, int]]:
        """(size, mtime_ns, ctime_ns) of each failed file, as it was when it failed."""
        rows = self.conn.execute("SELECT path, size, mtime_ns, ctime_ns FROM errors WHERE size IS NOT NULL "
                               "AND mtime_ns IS NOT NULL AND ctime_ns IS NOT NULL").fetchall()
        return {_from_db(path): (size, mtime_ns, ctime_ns) for path, size, mtime_ns, ctime_ns in rows}

    def forget_errors(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM errors WHERE path = ?", [(_to_db(p),) for p in paths])

    def errors(self) -> list[tuple[str, str, float]]:
        rows = self.conn.execute("SELECT path, reason, seen FROM errors ORDER BY path").fetchall()
        return [(_from_db(path), reason, seen) for path, reason, seen in rows]


_COLUMNS = "id, path, size, mtime_ns, sha256, width, height, format, added, folder, name, taken, camera, date"
_SCHEMA = {
    "images": set(_COLUMNS.split(", ")),
    "vectors": {"id", "vector"},
    "errors": {"path", "reason", "seen"},
    "manifest": {"key", "value"},
    "labels": {"image_id", "label"},
    "removed": {"id"},
}


def _image_row(row: tuple) -> ImageRow:
    return ImageRow(row[0], _from_db(row[1]), *row[2:9], _from_db(row[9]), _from_db(row[10]), *row[11:])


def _split(path: str) -> tuple[str | bytes, str | bytes]:
    """(folder, file name) of a stored path, as stored (see `_to_db`)."""
    folder, _, name = path.rpartition("/")
    return _to_db(folder), _to_db(name)


def local_date(mtime_ns: int) -> str:
    """A file time as local ISO 8601 to the second, comparable with EXIF capture times."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(mtime_ns / 1e9))


def _to_db(path: str) -> str | bytes:
    """Paths are TEXT, except a file name that is not valid UTF-8 (Python holds it with surrogate
    escapes, which SQLite cannot store as text): that one is stored as its raw bytes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")


def _is_blob(value: object, size: int) -> bool:
    """Whether a stored value is a blob of `size` bytes (a vector or crop view as written; anything else
    is damage: text, a number, NULL, or another length)."""
    return type(value) is bytes and len(value) == size  # noqa: E721 (not a subclass)


def _from_db(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def page_size_for(dim: int) -> int:
    """The smallest SQLite page size at which a page of vector rows wastes at most 15% of itself.
    A row (about 12 bytes of header and the blob) must fit whole in a page; at the default 4096 bytes
    one 1280-d float16 vector (2560 bytes) takes a page alone, 60% more than it needs."""
    row = VECTOR_BYTES * dim + 12
    for size in (4096, 8192, 16384, 32768, 65536):
        usable = size - 8 - 2  # page header, and each row's 2-byte cell pointer is counted below
        per_page = usable // (row + 2)
        if per_page and size / per_page <= 1.15 * row:
            return size
    return 65536


MMAP_BYTES = 1 << 40
"""How much of the file SQLite may memory-map (it caps this at its compile-time limit, 2 GB by default)."""

CROP_SLOTS = 8
"""Keys of crop-view vectors: image id x this + the view's place (at most `images.MAX_VIEWS` views)."""

MAX_CROP_IMAGE_ID = (1 << 63) // CROP_SLOTS
"""Images with ids from here on (only a crafted file has them) cannot have crop views: their keys
would not fit SQLite's integers."""


_STRAY_CROP_ROW = f"id % {CROP_SLOTS} >= ? OR id < 0 OR id / {CROP_SLOTS} NOT IN (SELECT id FROM images)"
"""A `crop_vectors` row that is no view (the parameter: views per image) of an existing image."""


def crop_key(image_id: int, view: int) -> int:
    """The `crop_vectors` key of an image's view."""
    if not 0 <= image_id < MAX_CROP_IMAGE_ID:
        raise IndexCorruptError(f"image id {image_id} is out of the range an index with crop views can hold")
    return image_id * CROP_SLOTS + view


VECTOR_BYTES = 2
"""Bytes per dimension of a stored vector: float16, little-endian (format 3 on)."""


VECTOR_DTYPE = "<f2"
"""How a vector is stored: little-endian float16, `dim` values per blob (format 3)."""


def vector_blob(vector: np.ndarray) -> bytes:
    """A vector as the store keeps it."""
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


def blobs_to_matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stored vector blobs (each already checked to be `blob_size(dim)` bytes) as float32 rows."""
    return np.frombuffer(b"".join(blobs), VECTOR_DTYPE).reshape(len(blobs), dim).astype(np.float32)


def blob_size(dim: int) -> int:
    return np.dtype(VECTOR_DTYPE).itemsize * dim


_to_blob = vector_blob


def _from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=VECTOR_DTYPE).astype(np.float32)


def _writable_dir(path: Path) -> bool:
    return os.access(path, os.W_OK)
