"""`imgsim export parquet` and `imgsim import parquet`: a round trip gives identical search results,
and crafted files (wrong dimension, NaN vectors, wrong model, ...) are refused with a clear error."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from imgsim import ImgsimError, Index
from imgsim.cli import cli
from imgsim.export.parquet import METADATA_KEY, export_parquet, import_parquet

from .conftest import read_only_folder
from .tiny_model import TINY_MODEL


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def noise_images(folder, count: int, seed: int = 0, size=(48, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR).save(folder / f"n{seed}-{i:04d}.png")
    return folder


@pytest.fixture
def big_index(tmp_path, photos):
    """The photos and 220 noise pictures with the tiny model: over 200 images, so scores are centred."""
    noise_images(photos / "noise", 220)
    name = tmp_path / "big"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(photos)
    return name


def test_round_trip_gives_identical_search_results(tmp_path, big_index, photos):
    with Index.open(big_index) as index:  # a column added by some later migration, metadata, and labels
        index.store.conn.execute("ALTER TABLE images ADD COLUMN rating INTEGER")
        index.store.conn.execute("UPDATE images SET rating = id % 5, camera = 'X100' WHERE id % 3 = 0")
        index.store.conn.execute("INSERT INTO labels SELECT id, 'even' FROM images WHERE id % 2 = 0")
    file = tmp_path / "big.parquet"
    result = run("export", "parquet", file, "--index", big_index, "--row-group-size", 64)
    assert result.exit_code == 0, result.output
    table = pq.read_table(file)
    parquet = pq.ParquetFile(file)
    assert parquet.metadata.num_row_groups == -(-table.num_rows // 64)
    meta = json.loads(parquet.schema_arrow.metadata[METADATA_KEY])
    assert meta["manifest"]["model"] == TINY_MODEL and meta["manifest"]["dim"] == 48
    assert meta["manifest"]["center"] is not None and meta["count"] == table.num_rows
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 48)
    assert {"id", "path", "size", "mtime_ns", "sha256", "width", "height", "format", "camera", "rating", "labels"} \
        <= set(table.column_names)
    rows = table.to_pylist()
    assert [r["labels"] for r in rows] == [["even"] if r["id"] % 2 == 0 else [] for r in rows]
    assert [r["camera"] for r in rows] == ["X100" if r["id"] % 3 == 0 else None for r in rows]

    result = run("import", "parquet", file, "--index", tmp_path / "copy")
    assert result.exit_code == 0, result.output
    queries = [photos / "coffee.jpg", photos / "noise" / "n0-0007.png", photos / "astronaut.jpg"]
    with Index.open(big_index, read_only=True) as a, Index.open(tmp_path / "copy", read_only=True) as b:
        assert len(a) == len(b) == table.num_rows
        assert a.info()["hnsw"] == b.info()["hnsw"]
        assert a.store.manifest()["center"] == pytest.approx(b.store.manifest()["center"], abs=1e-7)
        assert [(r.id, r.path, r.size, r.sha256) for r in a.rows()] == [(r.id, r.path, r.size, r.sha256) for r in b.rows()]
        for query in queries:
            assert a.search(query, k=10) == b.search(query, k=10)
    with Index.open(tmp_path / "copy") as b:
        assert b.verify().ok
        assert b.search(queries[0], k=1)[0].path == "coffee.jpg"


def test_export_streams_a_selection(tmp_path, photos):
    from imgsim.export.source import Selection

    with Index.create(tmp_path / "p", model=TINY_MODEL) as index:
        index.sync(photos)
        ids = [r.id for r in index.rows()][:3]
        assert export_parquet(index, tmp_path / "some.parquet", selection=Selection(ids=ids)) == 3
        assert export_parquet(index, tmp_path / "where.parquet",
                              selection=Selection(where="images.path LIKE ?", params=["c%"])) == \
            sum(r.path.startswith("c") for r in index.rows())
    assert pq.read_table(tmp_path / "some.parquet")["id"].to_pylist() == ids


@pytest.fixture
def exported(tmp_path, photos):
    with Index.create(tmp_path / "src", model=TINY_MODEL) as index:
        index.sync(photos)
        export_parquet(index, tmp_path / "good.parquet")
    return tmp_path / "good.parquet"


def rewrite(source, target, *, meta=None, vectors=None, ids=None, schema_meta=True):
    table = pq.read_table(source)
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    if meta:
        meta(metadata)
    if vectors is not None:
        flat = pa.array(np.asarray(vectors, np.float32).reshape(-1), pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, np.asarray(vectors).shape[1])
        table = table.set_column(table.column_names.index("vector"), "vector", column)
    if ids is not None:
        table = table.set_column(0, "id", pa.array(ids, pa.int64()))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)} if schema_meta else None)
    pq.write_table(table, target)
    return target


def vectors_of(file) -> np.ndarray:
    return np.stack(pq.read_table(file)["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)


CRAFTED = {
    "wrong dimension": (dict(vectors="47"), "47 dimensions; the model gives 48"),
    "manifest dimension": (dict(meta=lambda m: m["manifest"].update(dim=64)), "64 dimensions; tiny-test gives 48"),
    "NaN vector": (dict(vectors="nan"), "has NaN or infinite values"),
    "infinite vector": (dict(vectors="inf"), "has NaN or infinite values"),
    "not unit length": (dict(vectors="long"), "is not unit length"),
    "unknown model": (dict(meta=lambda m: m["manifest"].update(model="resnet9000")), "model 'resnet9000'"),
    "other model file": (dict(meta=lambda m: m["manifest"].update(model_sha256="ab" * 32)),
                         "made with a different tiny-test file"),
    "newer format": (dict(meta=lambda m: m.update(format_version=99)), "written by a newer imgsim"),
    "no imgsim metadata": (dict(schema_meta=False), "was not written by `imgsim export parquet`"),
    "duplicate ids": (dict(ids="dup"), "duplicate ids or paths"),
    "negative ids": (dict(ids="neg"), "ids must be positive"),
    "row count": (dict(meta=lambda m: m.update(count=3)), "its metadata says 3"),
    "bad manifest": (dict(meta=lambda m: m["manifest"].update(hnsw="x")), "invalid manifest"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_files_are_refused(tmp_path, exported, case):
    change, message = CRAFTED[case]
    change = dict(change)
    vectors = vectors_of(exported)
    if change.get("vectors") == "47":
        change["vectors"] = vectors[:, :47] / np.linalg.norm(vectors[:, :47], axis=1, keepdims=True)
    elif change.get("vectors") in ("nan", "inf", "long"):
        vectors[3, 5] = {"nan": np.nan, "inf": np.inf, "long": 3.0}[change["vectors"]]
        change["vectors"] = vectors
    n = len(vectors)
    if change.get("ids") == "dup":
        change["ids"] = [1, 1] + list(range(3, n + 1))
    elif change.get("ids") == "neg":
        change["ids"] = [-5] + list(range(2, n + 1))
    crafted = rewrite(exported, tmp_path / "crafted.parquet", **change)
    with pytest.raises(ImgsimError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_parquet(crafted, tmp_path / "imported")
    assert sorted(p.name for p in tmp_path.iterdir() if "imported" in p.name) == []


def test_cli_refusals_are_one_line(tmp_path, exported):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet at all PAR1")
    result = run("import", "parquet", garbage, "--index", tmp_path / "x")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {garbage} is not a readable Parquet file")
    assert result.output.count("\n") == 1
    result = run("import", "parquet", tmp_path / "missing.parquet", "--index", tmp_path / "x")
    assert result.exit_code == 1 and "does not exist" in result.output
    run("import", "parquet", exported, "--index", tmp_path / "x")
    result = run("import", "parquet", exported, "--index", tmp_path / "x")
    assert result.exit_code == 1 and "an index already exists" in result.output


def test_missing_extra_says_what_to_install(tmp_path, photos, monkeypatch):
    with Index.create(tmp_path / "p", model=TINY_MODEL) as index:
        index.sync(photos)
    for module in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    result = run("export", "parquet", tmp_path / "p.parquet", "--index", tmp_path / "p")
    assert result.exit_code == 1
    assert result.output == "Error: pyarrow is not installed: pip install 'imgsim[export]'\n"
    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    result = run("export", "qdrant", "--path", tmp_path / "q", "--index", tmp_path / "p")
    assert result.output == "Error: qdrant-client is not installed: pip install 'imgsim[qdrant]'\n"


def test_an_import_into_a_read_only_folder_says_so_in_one_line(tmp_path, big_index):
    file = tmp_path / "big.parquet"
    assert run("export", "parquet", file, "--index", big_index).exit_code == 0
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    with read_only_folder(shelf):
        result = run("import", "parquet", file, "--index", shelf / "copy")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.stderr.startswith("Error: cannot create index") and result.stderr.count("\n") == 1
        assert list(shelf.iterdir()) == []
