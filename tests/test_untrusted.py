"""Index files from elsewhere may be truncated, garbage or crafted: always a clear error, never a crash."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imgsim import ImgsimError, Index
from imgsim.errors import IndexCorruptError
from imgsim.faiss_format import layout

from .conftest import TINY_MODEL


@pytest.fixture
def made(tmp_path, photos) -> Path:
    with Index.create(tmp_path / "idx", model=TINY_MODEL) as index:
        index.add(photos)
    return tmp_path / "idx"


def set_manifest(base: Path, **values) -> None:
    conn = sqlite3.connect(base.with_suffix(".sqlite"))
    with conn:
        for key, value in values.items():
            conn.execute("UPDATE manifest SET value = ? WHERE key = ?", (json.dumps(value), key))
    conn.close()


def open_in_child(base: Path, tiny_model_dir: Path) -> subprocess.CompletedProcess:
    """Open and search in a separate process, so that a crash would show as a signal, not kill pytest."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from tiny_model import *; from imgsim import models, Index, ImgsimError\n"
        "models.CATALOGUE[TINY_MODEL] = tiny_spec()\n"
        f"try:\n    Index.open({str(base)!r}, read_only=True).search(__import__('numpy').ones(48, 'f4'), k=3)\n"
        "    print('OPENED')\n"
        "except ImgsimError as e:\n    print('ERROR', e)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env={"IMGSIM_MODELS": str(tiny_model_dir), "PATH": "/usr/bin:/bin"}, timeout=60)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "zeros"])
def test_damaged_sqlite_is_a_clear_error(made, damage):
    sqlite_file = made.with_suffix(".sqlite")
    data = sqlite_file.read_bytes()
    sqlite_file.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"\x13\x37" * 5000, "empty": b"",
                             "zeros": b"\0" * len(data)}[damage])
    with pytest.raises(ImgsimError):
        with Index.open(made, read_only=True) as index:
            index.search(np.ones(48, "f4"))


def test_a_damaged_page_anywhere_in_the_sqlite_file_is_a_clear_error(made, photos):
    """Random bytes over any one page after the header (which the opening checks may never read):
    opening, searching, listing, finding duplicates and `info` either work or raise `ImgsimError`,
    never a raw `sqlite3.DatabaseError` (the new-user trial met one from the manifest, and from a
    search's vectors)."""
    sqlite_file = made.with_suffix(".sqlite")
    pristine = sqlite_file.read_bytes()
    conn = sqlite3.connect(sqlite_file)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    rng = np.random.default_rng(0)
    errors = 0
    for at in range(1, len(pristine) // page):
        damaged = bytearray(pristine)
        damaged[at * page:(at + 1) * page] = rng.integers(0, 256, page, dtype=np.uint8).tobytes()
        sqlite_file.write_bytes(bytes(damaged))
        try:
            with Index.open(made, read_only=True) as index:
                index.search(photos / "coffee.jpg", k=3)
                list(index.images())
                index.duplicates()
                index.info()
                list(index.rows())
        except ImgsimError:
            errors += 1
    assert errors > 0  # some pages matter


def test_verify_says_in_one_line_that_a_damaged_sqlite_page_is_beyond_repair(made):
    """SQLite's own findings (several lines of its own words) become one problem that says what to do."""
    sqlite_file = made.with_suffix(".sqlite")
    conn = sqlite3.connect(sqlite_file)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(sqlite_file.read_bytes())
    found = []
    for at in range(2, len(data) // page):  # the first page whose damage SQLite's check sees
        damaged = data[:at * page] + bytes(page) + data[(at + 1) * page:]
        sqlite_file.write_bytes(bytes(damaged))
        try:
            with Index.open(made, read_only=True) as index:
                found = [p for p in index.verify().problems if "SQLite's own check" in p]
        except ImgsimError:
            continue
        if found:
            break
    assert len(found) == 1 and "\n" not in found[0], found
    assert "--repair cannot mend that: restore a copy of the index, or index the folder into a new one" in found[0]


@pytest.mark.parametrize("values, message", [
    ({"hnsw": {"M": 10**9, "ef_construction": 40, "ef_search": 16}}, "invalid manifest"),
    ({"dim": 4096}, "dimensions"),
    ({"model": "gpt-image-9"}, "does not know"),
    ({"format_version": 99}, "newer imgsim"),
    # a newer format's preprocessing may name views this imgsim does not know: "newer", not "invalid"
    ({"format_version": 99, "preprocess": {"size": 224, "resize_to": 224, "resize": "squash", "interpolation":
      "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_views": ["sharp70"]}}, "newer imgsim"),
    ({"format_version": True}, "invalid manifest"),
    ({"root": 12}, "invalid manifest"),
])
def test_crafted_manifest_is_refused(made, values, message):
    set_manifest(made, **values)
    with pytest.raises(ImgsimError, match=message):
        Index.open(made, read_only=True)


def test_vector_of_the_wrong_size_is_reported(made):
    conn = sqlite3.connect(made.with_suffix(".sqlite"))
    with conn:
        conn.execute("UPDATE vectors SET vector = ? WHERE id = 1", (b"\0" * 12,))
    conn.close()
    made.with_suffix(".faiss").unlink()  # force a rebuild, which reads every vector
    with Index.open(made, read_only=True) as index:
        with pytest.raises(IndexCorruptError, match="is not 48 float16 values"):
            index.search(np.ones(48, "f4"))
        report = index.verify()
    assert not report.ok and any("1 stored vectors have the wrong size" in p for p in report.problems)
    with Index.open(made) as index:  # repairable: the entry goes (its file is embedded again by `imgsim index`)
        assert any("removed 1 image whose" in r for r in index.verify(repair=True).repaired)
        assert index.verify().ok and len(index.search(np.ones(48, "f4"), k=3)) == 3


def test_crafted_faiss_file_with_a_matching_checksum(made, tiny_model_dir):
    """An attacker who writes both files can make the checksum match: the structure check still holds."""
    faiss_file = made.with_suffix(".faiss")
    data = bytearray(faiss_file.read_bytes())
    fields = {name: (start, end) for name, start, end in layout(bytes(data), 48)}
    start, _ = fields["hnsw parameters"]  # entry_point, max_level, efConstruction, efSearch
    entry_point, max_level = struct.unpack_from("<ii", data, start)
    # A graph claiming levels no node has: faiss 1.15 loads it without complaint and then walks
    # links that are not there; other such edits crash it outright.
    struct.pack_into("<ii", data, start, entry_point, max_level + 3)
    faiss_file.write_bytes(bytes(data))
    set_manifest(made, faiss_sha256=hashlib.sha256(bytes(data)).hexdigest())
    child = open_in_child(made, tiny_model_dir)
    assert child.returncode == 0, child.stderr  # no segfault
    assert "OPENED" in child.stdout  # the file was refused, and the graph rebuilt from SQLite
    assert "rebuilding it from idx.sqlite" in child.stderr
    with Index.open(made, read_only=True) as index:
        problems = index.verify().problems
    assert len(problems) == 1 and "idx.faiss" in problems[0]


def test_manifest_that_is_not_json_is_one_line(made):
    conn = sqlite3.connect(made.with_suffix(".sqlite"))
    with conn:
        conn.execute("UPDATE manifest SET value = '{oops' WHERE key = 'created'")
    conn.close()
    with pytest.raises(IndexCorruptError, match="invalid manifest"):
        Index.open(made, read_only=True)


def test_missing_table_is_refused(made):
    conn = sqlite3.connect(made.with_suffix(".sqlite"))
    with conn:
        conn.execute("DROP TABLE errors")
    conn.close()
    with pytest.raises(IndexCorruptError, match="table errors is missing"):
        Index.open(made, read_only=True)


def test_a_checked_file_is_not_checked_again_until_it_changes(made, tiny_model_dir, monkeypatch):
    """The record of a passed check (in the user's cache, not in the index) spares the next opens the
    full read; any change to the file, even with its checksum put into the manifest, means a new check."""
    from imgsim import ann, checked

    monkeypatch.setattr(checked, "SETTLED_SECONDS", 0.0)
    calls = []
    real = ann.validate
    monkeypatch.setattr(ann, "validate", lambda data, dim: calls.append(dim) or real(data, dim))
    for _ in range(3):
        with Index.open(made, read_only=True) as index:
            assert len(index.graph) == len(index)
    assert calls == [48]  # checked once, then trusted from the record
    time.sleep(0.05)  # past the clock tick of the last change
    faiss_file = made.with_suffix(".faiss")
    data = bytearray(faiss_file.read_bytes())
    fields = {name: (start, end) for name, start, end in layout(bytes(data), 48)}
    start, _ = fields["hnsw parameters"]
    entry_point, max_level = struct.unpack_from("<ii", data, start)
    struct.pack_into("<ii", data, start, entry_point, max_level + 3)
    faiss_file.write_bytes(bytes(data))
    set_manifest(made, faiss_sha256=hashlib.sha256(bytes(data)).hexdigest())
    child = open_in_child(made, tiny_model_dir)
    assert child.returncode == 0, child.stderr
    assert "rebuilding it from idx.sqlite" in child.stderr


def test_damaged_vector_values_are_left_out_with_a_notice_not_ranked(made, photos, caplog):
    """Bytes damaged inside vector blobs (sizes intact, values not finite or not unit length): no
    garbage score comes out of a search (a trial saw 499999997952.0 ranked first), exact or not;
    `similar` on such an image and `dupes` say what is wrong; `verify` counts them, and
    `verify --repair` removes them for the next indexing to embed their files again."""
    with Index.open(made, read_only=True) as index:
        want = [r.path for r in index.search(photos / "coffee.jpg", k=3, expand=False)]
        ids = [i for i in index.store.ids() if index.image(int(i)).path != want[0]]
    conn = sqlite3.connect(made.with_suffix(".sqlite"))
    with conn:
        conn.execute("UPDATE vectors SET vector = ? WHERE id = ?", (np.full(48, 60000, "<f2").tobytes(), int(ids[1])))
        conn.execute("UPDATE vectors SET vector = ? WHERE id = ?", (np.full(48, np.inf, "<f2").tobytes(), int(ids[2])))
    conn.close()
    with Index.open(made, read_only=True) as index:
        damaged_paths = {index.image(int(i)).path for i in ids[1:3]}
        for exact in (False, True):
            results = index.search(photos / "coffee.jpg", k=3, expand=False, exact=exact)
            assert len(results) == 3 and all(-1 <= r.score <= 1 for r in results)
            assert not damaged_paths & {r.path for r in results} and results[0].path == want[0]
        assert "are missing or damaged: left out of results" in caplog.text
        with pytest.raises(IndexCorruptError, match="is damaged"):
            index.similar(int(ids[1]))
        groups = index.duplicates(threshold=0.5)
        assert not damaged_paths & {p for g in groups for p in g.paths}
        assert any("not finite unit vectors" in p for p in index.verify().problems)
    conn = sqlite3.connect(made.with_suffix(".sqlite"))
    with conn:  # and a third, cut short (the wrong size)
        conn.execute("UPDATE vectors SET vector = ? WHERE id = ?", (b"0123456789", int(ids[3])))
    conn.close()
    with Index.open(made, read_only=True) as index:
        damaged_paths.add(index.image(int(ids[3])).path)
        assert any("3 stored vectors have the wrong size (1 of them)" in p for p in index.verify().problems)
        groups = index.duplicates(threshold=0.5)  # the cut-short one: left out with the notice, no error
        assert not damaged_paths & {p for g in groups for p in g.paths}
    with Index.open(made) as index:  # repair: the rows go, and indexing the folder again embeds them anew
        assert any("removed 3 images whose stored vectors were damaged" in r for r in index.verify(repair=True).repaired)
        assert index.add(photos).added == 3
        assert index.verify().ok
        assert damaged_paths <= {r.path for r in index.search(photos / "coffee.jpg", k=len(index), expand=False)}


def test_an_sqlite_error_that_is_not_damage_is_not_called_damage(tmp_path):
    """A locked file or an I/O error met while reading is said as it is, not as "damaged ... re-index"."""
    from imgsim.index import _damaged_database

    locked = _damaged_database(tmp_path / "idx.sqlite", sqlite3.OperationalError("database is locked"))
    assert not isinstance(locked, IndexCorruptError) and "could not be read: database is locked" in str(locked)
    malformed = _damaged_database(tmp_path / "idx.sqlite", sqlite3.DatabaseError("database disk image is malformed"))
    assert isinstance(malformed, IndexCorruptError) and "is damaged" in str(malformed)
