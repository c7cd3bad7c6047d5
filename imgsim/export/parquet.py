"""An index as one Parquet file, and back.

One row per image: `id`, `path` (UTF-8; `path_bytes` holds the raw name of a file whose name is not
UTF-8), every other column of the index's `images` table, `labels` (a list of strings), `vector`
(a fixed-size list of float32, L2-normalised), and in an index with crop views `crop_views`: the
image's crop views as the index stores them (`crop_codes.py`), joined (null if it lacks them). An
imgsim that does not know that column imports the file without them. The file's key-value metadata holds, under the key
``imgsim``, a JSON object with the index's manifest (model name and sha256, dimensions,
preprocessing, pooling, metric, HNSW parameters, the centring mean) so that a reader knows exactly
how to embed and score a query. Written row group by row group, straight from SQLite, so memory is
bounded by the row group size, not by the index.

Import trusts nothing in the file: the model must be one this imgsim knows with the same file
(sha256), the vectors must have its dimensions and be finite and unit length, ids and paths unique.
The index is built under a temporary name and put in place only when complete.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ImgsimError, ModelError
from ..files import discard
from ..images import is_soft, parse_view
from ..index import Index, index_files
from .. import crop_codes
from ..store import crop_key, vector_blob
from . import require
from .source import ALL, Batch, Selection, Source, quoted, text_of

FORMAT = "imgsim-parquet"
FORMAT_VERSION = 3
"""The newest file format this imgsim reads. 1: the first. 2: a file whose preprocessing averages grey
views (``greyNN``) into its vectors, which an imgsim reading only 1 does not know. 3: a file with soft
crop views (``softNN``), which an imgsim reading only 2 does not know (it would find the manifest
invalid rather than import the file without them). Each file is written as the oldest that holds it."""

GREY_FILE_FORMAT = 2
"""The format of a file with grey views averaged into its vectors."""
METADATA_KEY = b"imgsim"
DEFAULT_ROW_GROUP = 8192
ProgressFn = Callable[[int, int], None]

_ARROW_TYPES = {"integer": "int64", "real": "float64", "text": "string", "blob": "binary", "numeric": "string"}
"""How an `images` column's SQLite affinity is written. NUMERIC columns (DATETIME, BOOLEAN, ...) hold
values of any type in SQLite and are written as text."""

_MANIFEST_KEYS = ("format_version", "model", "model_sha256", "dim", "metric", "preprocess", "pooling", "hnsw",
                  "center", "created")
UNIT_TOLERANCE = 1e-3


def _pa():
    return require("pyarrow", "export", "pyarrow")


CROP_COLUMN = "crop_views"


def schema(source: Source, crop_views: bool = False):
    pa = _pa()
    fields = [pa.field("id", pa.int64(), nullable=False)]
    for column in source.columns:
        if column.name == "path":
            fields.append(pa.field("path", pa.string(), nullable=False))
            fields.append(pa.field("path_bytes", pa.binary()))
        else:
            fields.append(pa.field(column.name, getattr(pa, _ARROW_TYPES[column.affinity])()))
    fields.append(pa.field("labels", pa.list_(pa.string()), nullable=False))
    fields.append(pa.field("vector", pa.list_(pa.float32(), source.dim), nullable=False))
    if crop_views:
        fields.append(pa.field(CROP_COLUMN, pa.binary()))
    return pa.schema(fields)


def _table(batch: Batch, source: Source, arrow_schema, crops: list[bytes | None] | None = None):
    pa = _pa()
    arrays = [pa.array(batch.ids, pa.int64())]
    for column in source.columns:
        values = batch.values[column.name]
        if column.name == "path":
            arrays.append(pa.array([text_of(v) for v in values], pa.string()))
            arrays.append(pa.array([v if isinstance(v, bytes) else None for v in values], pa.binary()))
        elif column.affinity in ("text", "numeric"):
            arrays.append(pa.array([text_of(v) for v in values], pa.string()))
        elif column.affinity == "blob":
            arrays.append(pa.array([v if v is None or isinstance(v, bytes) else str(v).encode() for v in values],
                                   pa.binary()))
        else:
            arrays.append(pa.array(values, arrow_schema.field(column.name).type))
    arrays.append(pa.array(batch.labels, pa.list_(pa.string())))
    flat = pa.array(np.ascontiguousarray(batch.vectors, dtype=np.float32).reshape(-1), pa.float32())
    arrays.append(pa.FixedSizeListArray.from_arrays(flat, source.dim))
    if crops is not None:
        arrays.append(pa.array(crops, pa.binary()))
    return pa.Table.from_arrays(arrays, schema=arrow_schema)


def _crops_of(index: Index, ids) -> list[bytes | None]:
    """Each image's crop views as stored, joined; None where any is missing or damaged."""
    prep = index.manifest.preprocess
    views, size = len(prep.crop_views), crop_codes.blob_size(prep.crop_code, index.manifest.dim)
    each = index.store.crop_blobs(ids, views, size)
    return [each.get(int(i)) for i in ids]


def export_parquet(index: Index, path: str | os.PathLike, *, selection: Selection = ALL,
                   row_group_size: int = DEFAULT_ROW_GROUP, compression: str = "zstd",
                   on_progress: ProgressFn | None = None) -> int:
    """Write the selected images of `index` to the Parquet file `path`; returns the number of rows.
    The file appears whole or not at all (written beside it under a temporary name, then renamed)."""
    pq = require("pyarrow.parquet", "export", "pyarrow")
    if row_group_size < 1:
        raise ImgsimError("the row group size must be at least 1")
    target = Path(path)
    if not target.parent.is_dir():
        raise ImgsimError(f"folder {target.parent} does not exist")
    source = Source(index.store)
    with_crops = bool(index.manifest.preprocess.crop_views)
    arrow_schema = schema(source, with_crops)
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with source.snapshot():
            total = source.count(selection)
            arrow_schema = arrow_schema.with_metadata({METADATA_KEY: json.dumps(_metadata(index, source, total))})
            plain = [f.name for f in arrow_schema if f.name not in ("vector", CROP_COLUMN)]  # not the vectors
            with pq.ParquetWriter(staged, arrow_schema, compression=compression, use_dictionary=plain,
                                  write_statistics=plain) as writer:
                for batch in source.batches(selection, batch_size=row_group_size):
                    crops = _crops_of(index, batch.ids) if with_crops else None
                    writer.write_table(_table(batch, source, arrow_schema, crops), row_group_size=row_group_size)
                    written += len(batch)
                    if on_progress:
                        on_progress(written, total)
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staged, target)
    except OSError as e:
        discard(staged)
        raise ImgsimError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        discard(staged)
        raise
    return written


def _metadata(index: Index, source: Source, count: int) -> dict:
    manifest = {key: source.manifest.get(key) for key in _MANIFEST_KEYS}
    prep = index.manifest.preprocess
    version = FORMAT_VERSION if any(is_soft(view) for view in prep.crop_views) else \
        GREY_FILE_FORMAT if any(parse_view(view)[1] for view in prep.index_views) else 1
    root = index.root
    return {
        "format": FORMAT,
        "format_version": version,
        "imgsim_version": __version__,
        "exported": time.time(),
        "count": count,
        "root": str(root) if root else None,
        "manifest": manifest,
        "query": "embed the query with the manifest's model, preprocessing and pooling, L2-normalise it; "
                 "if `center` is set, subtract it from the query and from every vector and normalise both "
                 "again; score by cosine (`imgsim embed FILE --json --index NAME` does the query side).",
    }


# -- import -----------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict:
    """The imgsim metadata of a Parquet file, checked; raises `ImgsimError` for anything else."""
    pq = require("pyarrow.parquet", "export", "pyarrow")
    try:
        file = pq.ParquetFile(path)
    except FileNotFoundError:
        raise ImgsimError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ImgsimError(f"{path} is not a readable Parquet file ({_first_line(e)})") from None
    raw = (file.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ImgsimError(f"{path} was not written by `imgsim export parquet` (no imgsim metadata)")
    try:
        meta = json.loads(raw)
        manifest = meta["manifest"]
        if meta.get("format") != FORMAT or not isinstance(manifest, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ImgsimError(f"{path} has invalid imgsim metadata") from None
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ImgsimError(f"{path} was written by a newer imgsim (format {meta.get('format_version')!r}): "
                          f"upgrade imgsim to import it")
    meta["_file"] = file
    return meta


def import_parquet(path: str | os.PathLike, index_path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                   batch_size: int = DEFAULT_ROW_GROUP, on_progress: ProgressFn | None = None) -> int:
    """Build a new index at `index_path` from a file written by `export_parquet`; returns its size.

    `root` is where the images are on this machine (default: where they were when exported, if that
    folder exists here). Nothing is left behind if the file is refused."""
    from ..hnsw import HnswParams
    from ..images import Preprocess
    from ..manifest import format_for
    from ..models import Model, parse_pooling, spec_for

    meta = read_metadata(path)
    file = meta.pop("_file")
    manifest = meta["manifest"]
    name = manifest.get("model")
    try:
        spec = spec_for(name)
    except ModelError:
        raise ImgsimError(f"{path} was made with model {name!r}, which this imgsim does not know") from None
    dim = manifest.get("dim")
    if dim != spec.dim:
        raise ImgsimError(f"{path} says its vectors have {dim!r} dimensions; {name} gives {spec.dim}")
    try:
        hnsw = HnswParams.from_dict(manifest["hnsw"])
        made = Preprocess.from_dict(manifest["preprocess"])
        parse_pooling(manifest.get("pooling") or "avg")
    except (KeyError, TypeError, ValueError, ModelError):
        raise ImgsimError(f"{path} has an invalid manifest in its imgsim metadata") from None
    try:
        model = Model.load(name)
    except ModelError as e:
        raise ImgsimError(f"cannot import {path}: {e}") from None
    if manifest.get("model_sha256") != model.sha256:
        raise ImgsimError(f"{path} was made with a different {name} file (sha256 "
                          f"{str(manifest.get('model_sha256'))[:12]}...) than {model.path} (sha256 "
                          f"{model.sha256[:12]}...): its vectors would not match queries; install the same file")
    _check_schema(path, file.schema_arrow, dim)
    # Crop views come along where the file has them (an older export left them out: scored without).
    crops = (len(made.crop_views), crop_codes.blob_size(made.crop_code, dim)) \
        if made.crop_views and CROP_COLUMN in file.schema_arrow.names else None

    faiss_path, sqlite_path = index_files(index_path)
    if sqlite_path.exists():
        raise ImgsimError(f"an index already exists at {sqlite_path}: import into a new --index")
    if root is None and meta.get("root") and Path(meta["root"]).is_dir():
        root = meta["root"]
    staging = sqlite_path.with_name(f".{sqlite_path.stem}.import-{os.getpid()}")
    staged_faiss, staged_sqlite = index_files(staging)
    imported = 0
    try:
        with Index.create(staging, model=name, root=root, hnsw=hnsw, crop_views=()) as index:
            store = index.store
            table_columns = {row[1]: row for row in store.conn.execute("PRAGMA table_info(images)")}
            names = [n for n in file.schema_arrow.names if n in table_columns and n != "id"]
            missing = [n for n, row in table_columns.items() if row[3] and row[4] is None and n not in names
                       and n != "id"]
            if missing:
                raise ImgsimError(f"{path} lacks the column(s) {', '.join(missing)}")
            has_labels = "labels" in file.schema_arrow.names and _has_labels_table(store)
            insert = (f"INSERT INTO images (id, {', '.join(quoted(n) for n in names)}) "
                      f"VALUES ({', '.join('?' * (len(names) + 1))})")
            total = file.metadata.num_rows
            preprocess = manifest["preprocess"] if crops else _without_crop_views(manifest["preprocess"])
            with store.transaction():  # its format: averaged grey views (format 5) are exported
                store.set_manifest(preprocess=preprocess, pooling=manifest.get("pooling") or "avg",
                                   format_version=format_for(Preprocess.from_dict(preprocess)))
            for record_batch in file.iter_batches(batch_size=batch_size):
                ids, rows, vectors, labels = _checked_rows(path, record_batch, names, dim, imported)
                crop_rows = _checked_crop_rows(path, record_batch, ids, *crops) if crops else []
                try:
                    with store.transaction():
                        store.conn.executemany(insert, rows)
                        store.conn.executemany("INSERT INTO vectors (id, vector) VALUES (?, ?)",
                                               zip(ids, (vector_blob(v) for v in vectors)))
                        store.conn.executemany("INSERT INTO crop_vectors (id, vector) VALUES (?, ?)", crop_rows)
                        if has_labels:
                            store.conn.executemany("INSERT OR IGNORE INTO labels (image_id, label) VALUES (?, ?)",
                                                   [(i, str(lab)) for i, labs in zip(ids, labels) for lab in labs or ()])
                except sqlite3.IntegrityError as e:
                    raise ImgsimError(f"{path} is inconsistent: {e} (duplicate ids or paths?)") from None
                imported += len(ids)
                if on_progress:
                    on_progress(imported, total)
            if isinstance(meta.get("count"), int) and meta["count"] != imported:
                raise ImgsimError(f"{path} holds {imported} rows; its metadata says {meta['count']}")
            index.rebuild()
            center = manifest.get("center")
            if center is not None and index.manifest.center is not None:
                # The exported collection's own mean, so that scores are the original's: the graph's,
                # learned from its 8-bit codes, differs from it by ~1e-3. (Checked on open, as any manifest.)
                with index.store.transaction():
                    index.store.set_manifest(center=center)
        with Index.open(staging) as check:  # everything a user would open is checked once more
            if len(check) != imported:
                raise ImgsimError(f"import of {path} is incomplete")
        os.replace(staged_faiss, faiss_path)
        try:
            os.link(staged_sqlite, sqlite_path)
        except FileExistsError:
            raise ImgsimError(f"an index appeared at {sqlite_path} meanwhile: import into a new --index") from None
    finally:
        for leftover in (staged_faiss, staged_sqlite, Path(f"{staged_sqlite}-wal"), Path(f"{staged_sqlite}-shm")):
            discard(leftover)  # never an error of its own (a read-only folder: the error is why nothing was made)
    return imported


def _without_crop_views(preprocess: dict) -> dict:
    """A manifest's preprocessing without crop views, for a file that holds none (an older export):
    its import scores each picture by its own vector alone."""
    return {key: value for key, value in preprocess.items() if key not in ("crop_views", "crop_code")}


def _checked_crop_rows(path, record_batch, ids: list[int], views: int, size: int) -> list[tuple[int, bytes]]:
    """The `crop_vectors` rows of one record batch: each image's crop views, `views` of `size` bytes
    joined (any bytes are a valid 2-bit code; float16 ones are checked where they are scored, as in
    any index); an image with none keeps none (`imgsim verify` reports it, as it did where exported)."""
    pa = _pa()
    column = record_batch.column(CROP_COLUMN)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ImgsimError(f"{path}: column {CROP_COLUMN!r} is {column.type}, not binary")
    rows = []
    for image_id, joined in zip(ids, column.to_pylist()):
        if joined is None:
            continue
        if len(joined) != views * size:
            raise ImgsimError(f"{path}: the crop views of image {image_id} are {len(joined)} bytes, not "
                              f"{views} of {size}")
        try:
            rows += [(crop_key(image_id, view), joined[view * size:(view + 1) * size]) for view in range(views)]
        except ImgsimError as e:
            raise ImgsimError(f"{path}: {e}") from None
    return rows


def _has_labels_table(store) -> bool:
    return {"image_id", "label"} <= {row[1] for row in store.conn.execute("PRAGMA table_info(labels)")}


def _check_schema(path, arrow_schema, dim: int) -> None:
    pa = _pa()
    for needed in ("id", "path", "vector"):
        if needed not in arrow_schema.names:
            raise ImgsimError(f"{path} has no {needed!r} column")
    vector_type = arrow_schema.field("vector").type
    if not pa.types.is_fixed_size_list(vector_type) or not pa.types.is_float32(vector_type.value_type):
        raise ImgsimError(f"{path}: column 'vector' is {vector_type}, not a fixed-size list of float32")
    if vector_type.list_size != dim:
        raise ImgsimError(f"{path}: its vectors have {vector_type.list_size} dimensions; the model gives {dim}")
    if not pa.types.is_integer(arrow_schema.field("id").type):
        raise ImgsimError(f"{path}: column 'id' is not an integer column")


def _checked_rows(path, record_batch, names: list[str], dim: int, offset: int):
    """One record batch as rows to insert, after checking every value imgsim relies on."""
    pa = _pa()
    n = record_batch.num_rows
    if n == 0:
        return [], [], np.empty((0, dim), np.float32), []
    columns = {name: record_batch.column(name) for name in record_batch.schema.names}
    ids_array = columns["id"]
    vector_array = columns["vector"]
    if ids_array.null_count or vector_array.null_count:
        raise ImgsimError(f"{path}: rows {offset + 1}-{offset + n} have missing ids or vectors")
    ids = [int(i) for i in ids_array.to_numpy(zero_copy_only=False)]
    if min(ids) < 1 or max(ids) >= 2**63 - 1:
        raise ImgsimError(f"{path}: image ids must be positive integers")
    flat = vector_array.flatten()
    vectors = np.asarray(flat.to_numpy(zero_copy_only=False), dtype="<f4").reshape(n, dim)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ImgsimError(f"{path}: the vector of image {ids[row]} has NaN or infinite values")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise ImgsimError(f"{path}: the vector of image {ids[row]} is not unit length (norm {norms[row]:.4g}); "
                          f"imgsim vectors are L2-normalised")
    raw_paths = columns["path_bytes"].to_pylist() if "path_bytes" in columns else [None] * n
    values = []
    for name in names:
        column = columns[name]
        if name == "path":
            texts = column.to_pylist()
            if any(not t and not raw for t, raw in zip(texts, raw_paths)):
                raise ImgsimError(f"{path}: rows {offset + 1}-{offset + n} include an empty path")
            values.append([raw if raw else t for t, raw in zip(texts, raw_paths)])
        elif pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
            raise ImgsimError(f"{path}: column {name!r} holds lists, not single values")
        else:
            values.append(column.to_pylist())
    rows = [(image_id, *row) for image_id, row in zip(ids, zip(*values))] if names else [(i,) for i in ids]
    labels = columns["labels"].to_pylist() if "labels" in columns else [None] * n
    return ids, rows, vectors, labels


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
