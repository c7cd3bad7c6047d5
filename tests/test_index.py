"""The `Index` object with the tiny model: what gets embedded, moved, removed, rebuilt, refused."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imgsim import ImgsimError, Index, IndexLockedError, ModelError, ReadOnlyIndexError
from imgsim.errors import IndexCorruptError
from imgsim.store import NewImage

from .conftest import TINY_MODEL, build_index, read_only_folder


@pytest.fixture
def index(tmp_path, photos):
    with Index.create(tmp_path / "idx", model=TINY_MODEL) as idx:
        idx.add(photos)
        yield idx


def n_photos(folder) -> int:
    return len(list(folder.glob("*.jpg")))


def test_add_stores_relative_paths_and_metadata(index, photos):
    assert len(index) == n_photos(photos)
    assert index.root == photos.resolve()
    row = next(r for r in index.rows() if r.path == "coffee.jpg")
    with Image.open(photos / "coffee.jpg") as img:
        assert (row.width, row.height, row.format) == (*img.size, "JPEG")
    assert row.size == (photos / "coffee.jpg").stat().st_size


def test_unchanged_folder_embeds_nothing(index, photos):
    report = index.sync(photos)
    assert (report.embedded, report.added, report.unchanged) == (0, 0, n_photos(photos))


def test_touched_file_is_not_embedded_again(index, photos):
    os.utime(photos / "coffee.jpg", ns=(1, 1))
    report = index.sync(photos)
    assert report.embedded == 0 and report.unchanged == n_photos(photos)


def test_changed_file_is_embedded_again(index, photos):
    Image.new("RGB", (64, 64), "green").save(photos / "coffee.jpg")
    report = index.sync(photos)
    assert (report.updated, report.embedded) == (1, 1)
    assert index.search(photos / "coffee.jpg", k=1)[0].path == "coffee.jpg"
    assert len(index) == n_photos(photos)


def test_labels_stay_with_an_edited_picture_and_follow_swapped_ones(index, photos, monkeypatch):
    """A picture edited in place keeps its labels; two files that swapped names keep theirs with their
    content; and a run interrupted before a changed file's new row is written leaves its old row as it
    was, labels and all (the old row goes in the same transaction as the new)."""
    index.label([photos / "coffee.jpg"], add=["mug"])
    index.label([photos / "rocket.jpg"], add=["launch"])
    index.label([photos / "chelsea.jpg"], add=["cat"])
    with Image.open(photos / "coffee.jpg") as img:
        img.rotate(90, expand=True).save(photos / "coffee.jpg", quality=90)
    (photos / "rocket.jpg").rename(photos / "swap.tmp")
    (photos / "chelsea.jpg").rename(photos / "rocket.jpg")
    (photos / "swap.tmp").rename(photos / "chelsea.jpg")
    report = index.sync(photos)
    assert (report.updated, report.added, report.removed) == (3, 0, 0)

    def labels(name):
        return next(r["labels"] for r in index.images() if r["path"] == name)

    assert (labels("coffee.jpg"), labels("rocket.jpg"), labels("chelsea.jpg")) == (["mug"], ["cat"], ["launch"])
    assert index.verify().ok
    # Interrupted while embedding: nothing of the changed file is lost.
    Image.new("RGB", (64, 64), "green").save(photos / "coffee.jpg")
    old_id = next(r["id"] for r in index.images() if r["path"] == "coffee.jpg")
    monkeypatch.setattr("imgsim.index.embed_files", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        index.sync(photos)
    assert next((r["id"], r["labels"]) for r in index.images() if r["path"] == "coffee.jpg") == (old_id, ["mug"])
    monkeypatch.undo()
    assert index.sync(photos).updated == 1 and labels("coffee.jpg") == ["mug"] and index.verify().ok


def test_renamed_file_keeps_its_vector(index, photos):
    old_id = next(r.id for r in index.rows() if r.path == "rocket.jpg")
    (photos / "sub").mkdir()
    (photos / "rocket.jpg").rename(photos / "sub" / "launch.jpg")
    report = index.sync(photos)
    assert (report.moved, report.embedded, report.removed) == (1, 0, 0)
    hit = index.search(photos / "sub" / "launch.jpg", k=1)[0]
    assert (hit.id, hit.path) == (old_id, "sub/launch.jpg")


def test_deleted_file_leaves_the_results(index, photos):
    (photos / "coffee.jpg").unlink()
    report = index.sync(photos)
    assert report.removed == 1 and len(index) == n_photos(photos)
    assert all(r.path != "coffee.jpg" for r in index.search(photos / "rocket.jpg", k=50))


def test_keep_missing(index, photos):
    (photos / "coffee.jpg").unlink()
    report = index.sync(photos, remove_missing=False)
    assert report.removed == 0 and report.kept == 1 and len(index) == n_photos(photos) + 1
    assert index.sync(photos, remove_missing=False).kept == 1  # still counted, still kept
    assert index.sync(photos).removed == 1 and len(index) == n_photos(photos)


def test_byte_identical_copy_reuses_the_vector(index, photos):
    shutil.copy(photos / "coffee.jpg", photos / "coffee-copy.jpg")
    report = index.sync(photos)
    assert (report.added, report.embedded) == (1, 0)
    top = index.search(photos / "coffee.jpg", k=2)
    assert {r.path for r in top} == {"coffee.jpg", "coffee-copy.jpg"}


def test_bad_files_are_reported_and_skipped(index, photos, tmp_path):
    good = n_photos(photos)
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not a picture")
    skipped = []
    report = index.sync(photos, on_skip=lambda path, reason: skipped.append((os.path.basename(path), reason)))
    assert report.failed == 2 and report.unchanged == good
    assert sorted(name for name, _ in skipped) == ["empty.jpg", "text.png"]
    assert sorted(os.path.basename(p) for p, _, _ in index.errors()) == ["empty.jpg", "text.png"]


def test_removed_ids_never_come_back_and_the_graph_is_rebuilt(tmp_path, photos):
    path = tmp_path / "idx"
    build_index(path, photos)
    total = n_photos(photos)
    (photos / "coffee.jpg").unlink()
    with Index.open(path) as index:  # one removal: the id stays in the graph, excluded from results
        index.sync(photos)
        ids = {r.id for r in index.search(photos / "astronaut.jpg", k=100)}
        assert len(ids) == total - 1 and ids == {r.id for r in index.rows()}
    with Index.open(path, read_only=True) as index:
        info = index.info()
        assert (info["graph_size"], info["graph_dead"]) == (total, 1)
    for name in ["rocket.jpg", "camera.jpg", "moon.jpg"]:
        (photos / name).unlink()
    with Index.open(path) as index:  # now over the threshold: the graph is rebuilt without dead ids
        index.sync(photos)
    with Index.open(path, read_only=True) as index:
        info = index.info()
        assert (info["graph_size"], info["graph_dead"]) == (total - 4, 0)
        ids = {r.id for r in index.search(photos / "astronaut.jpg", k=100)}
        assert ids == {r.id for r in index.rows()}


def test_missing_or_damaged_faiss_file_is_rebuilt_from_sqlite(tmp_path, photos, caplog):
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL) as index:
        index.add(photos)
        expected = [r.id for r in index.search(photos / "coffee.jpg", k=5)]
    faiss_file = tmp_path / "idx.faiss"
    for damage in (lambda: faiss_file.write_bytes(faiss_file.read_bytes()[:100]),
                   lambda: faiss_file.write_bytes(b"\0" * 5000),
                   lambda: faiss_file.unlink()):
        damage()
        with Index.open(path) as index:
            assert [r.id for r in index.search(photos / "coffee.jpg", k=5)] == expected
        assert "rebuilding" in caplog.text
        caplog.clear()


def test_faiss_that_lags_behind_sqlite_is_caught_up(tmp_path, photos):
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL) as index:
        index.add([photos / "coffee.jpg"])
    stale = (tmp_path / "idx.faiss").read_bytes()
    with Index.open(path) as index:
        index.add(photos)
    (tmp_path / "idx.faiss").write_bytes(stale)  # as if the process died before the new file was renamed
    with Index.open(path) as index:
        report = index.verify()
        assert report.ok and "lacks" in " ".join(report.notes)
        assert index.search(photos / "rocket.jpg", k=1)[0].path == "rocket.jpg"
        assert index.info()["graph_size"] == n_photos(photos)
    with Index.open(path, read_only=True) as index:  # the caught-up graph was saved on close
        assert index.verify().notes == []


def test_second_writer_is_refused_but_readers_are_welcome(tmp_path, photos, caplog):
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL) as writer:
        writer.add(photos)
        with pytest.raises(IndexLockedError, match="being written by another process"):
            Index.open(path)
        with Index.open(path, read_only=True) as reader:
            assert len(reader) == n_photos(photos)
            with pytest.raises(ReadOnlyIndexError):
                reader.add(photos)
        # Mid-batch: a row committed, the graph not yet written with it; then the file gone too.
        row = writer.image(1)
        with writer.store.transaction():
            writer.store.insert([NewImage("later.jpg", row.size, row.mtime_ns, row.sha256, row.width, row.height,
                                          row.format, writer.vector(1))])
        with Index.open(path, read_only=True) as reader:  # work in progress, not damage to repair
            assert any("behind: another process is indexing" in n for n in reader.verify().notes)
        (tmp_path / "idx.faiss").rename(tmp_path / "aside.faiss")
        with Index.open(path, read_only=True) as reader:
            assert any("not written yet: another process is indexing" in n for n in reader.verify().notes)
            reader.search(photos / "coffee.jpg", k=1)
            assert "another process is indexing" in caplog.text and "verify --repair" not in caplog.text
    with Index.open(path, read_only=True) as reader:  # the writer wrote it whole as it closed
        assert not any("faiss" in n for n in reader.verify().notes)  # ("later.jpg" is not on disk: a note)
        assert reader.info()["graph_size"] == n_photos(photos) + 1


def _posix_locks_held(path) -> int:
    """This process's POSIX (fcntl) locks on `path`, from /proc/locks (SQLite's own locks)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as locks:
        return sum(1 for line in locks if "POSIX" in line and line.split()[4] == str(os.getpid())
                   and line.split()[5].endswith(f":{inode}"))


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="Linux's /proc/locks")
def test_asking_whether_a_writer_is_active_keeps_the_readers_sqlite_locks(tmp_path, photos):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it: the probe
    must not close one while the reader's connection holds SQLite's locks (a writer could then
    switch the file out of WAL under the reader, whose reads went stale)."""
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL) as writer:
        writer.add(photos)
        with Index.open(path, read_only=True) as reader:
            assert len(reader) == n_photos(photos)  # the connection holds its read lock now
            held = _posix_locks_held(tmp_path / "idx.sqlite")
            assert held > 0
            assert reader.store.writer_active()
            assert _posix_locks_held(tmp_path / "idx.sqlite") == held
    with Index.open(path, read_only=True) as reader:
        assert not reader.store.writer_active()


def test_index_in_a_read_only_folder_can_be_searched(tmp_path, photos):
    shipped = tmp_path / "dataset"
    shipped.mkdir()
    build_index(shipped / "idx", photos, root=photos)
    with read_only_folder(shipped):
        with Index.open(shipped / "idx", read_only=True) as index:
            assert index.search(photos / "coffee.jpg", k=1)[0].path == "coffee.jpg"
            assert len(index) == n_photos(photos)
        assert sorted(p.name for p in shipped.iterdir()) == ["idx.faiss", "idx.sqlite"]


def test_folder_moved_with_its_index_keeps_working(tmp_path, photos):
    build_index(photos / ".imgsim", photos)
    moved = tmp_path / "elsewhere"
    photos.rename(moved)
    with Index.open(moved / ".imgsim") as index:
        report = index.sync(moved)
        assert (report.unchanged, report.removed, report.moved) == (n_photos(moved), 0, 0)
        hit = index.search(moved / "coffee.jpg", k=1)[0]
        assert index.resolve(hit.path) == moved.resolve() / "coffee.jpg"


def test_root_override(tmp_path, photos):
    build_index(tmp_path / "idx", photos)
    copy = tmp_path / "copy"
    shutil.copytree(photos, copy)
    with Index.open(tmp_path / "idx", read_only=True, root=copy) as index:
        assert index.resolve("coffee.jpg") == copy.resolve() / "coffee.jpg"


def test_model_file_swapped_under_an_index_is_refused(tmp_path, photos, tiny_model_dir, monkeypatch):
    build_index(tmp_path / "idx", photos)
    other = tmp_path / "other-models"
    other.mkdir()
    (other / "tiny-test.onnx").write_bytes((tiny_model_dir / "tiny-test.onnx").read_bytes() + b"\0")
    monkeypatch.setenv("IMGSIM_MODELS", str(other))
    with Index.open(tmp_path / "idx", read_only=True) as index:
        with pytest.raises(ModelError, match="different tiny-test file"):
            index.search(photos / "coffee.jpg")


def test_not_an_index(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"SQLite format 3\0" + os.urandom(2000))
    with pytest.raises(IndexCorruptError):
        Index.open(tmp_path / "junk", read_only=True)
    (tmp_path / "plain.sqlite").write_bytes(b"")
    with pytest.raises(IndexCorruptError, match="not an imgsim index"):
        Index.open(tmp_path / "plain", read_only=True)


def test_create_refuses_to_overwrite(tmp_path):
    Index.create(tmp_path / "idx", model=TINY_MODEL).close()
    with pytest.raises(ImgsimError, match="already exists"):
        Index.create(tmp_path / "idx", model=TINY_MODEL)


def test_vectors_are_unit_length_cosine(index, photos):
    vector = index.embed(photos / "coffee.jpg")
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert index.search(vector, k=1)[0].score == pytest.approx(1.0, abs=1e-4)


def test_readers_see_each_committed_batch_while_a_writer_indexes(tmp_path, photos):
    path = tmp_path / "idx"
    seen = []

    def look(done, total):
        with Index.open(path, read_only=True) as reader:
            rows = list(reader.rows())
            seen.append((done, len(reader)))
            if rows:
                first = rows[0].path
                assert reader.search(photos / first, k=1)[0].path == first

    with Index.create(path, model=TINY_MODEL) as writer:
        writer.add(photos, on_progress=look, batch_size=3)
    assert [count for _, count in seen] == [done for done, _ in seen]  # each batch visible once committed
    assert len(seen) >= 4 and seen[-1][1] == n_photos(photos)


def test_copy_found_by_a_fresh_open_is_in_the_graph_once(tmp_path, photos):
    build_index(tmp_path / "idx", photos)
    shutil.copy(photos / "coffee.jpg", photos / "coffee-copy.jpg")
    with Index.open(tmp_path / "idx") as index:  # the graph is loaded lazily, after the plan is made
        index.sync(photos)
        paths = [r.path for r in index.search(photos / "coffee.jpg", k=4)]
        assert sorted(paths[:2]) == ["coffee-copy.jpg", "coffee.jpg"] and len(set(paths)) == len(paths)
    with Index.open(tmp_path / "idx", read_only=True) as index:
        assert index.verify().ok


def test_unreadable_subfolder_is_reported_and_its_entries_kept(tmp_path, photos, monkeypatch):
    (photos / "trip").mkdir()
    for name in ("rocket.jpg", "moon.jpg"):
        (photos / name).rename(photos / "trip" / name)
    build_index(tmp_path / "idx", photos)
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("trip"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr("imgsim.images.os.scandir", scandir)
    skipped = []
    with Index.open(tmp_path / "idx") as index:
        report = index.sync(photos, on_skip=lambda path, reason: skipped.append((path, reason)))
        assert (report.removed, report.failed) == (0, 1)
        assert skipped == [(str(photos / "trip"), "Permission denied")]
        assert len(index) == n_photos(photos) + 2


def test_large_collections_are_scored_around_their_mean(tmp_path, photos):
    from imgsim.graph import CENTER_MIN_IMAGES

    rng = np.random.default_rng(3)
    for i in range(CENTER_MIN_IMAGES):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST).save(photos / f"noise{i:03d}.png")
    with Index.create(tmp_path / "idx", model=TINY_MODEL) as index:
        index.add([photos / "coffee.jpg", photos / "rocket.jpg"])
        assert not index.info()["centred"]  # too few images to learn a mean from
        raw = index.search(photos / "rocket.jpg", k=2)
        index.add(photos)
        assert index.info()["centred"]
        mean = index.manifest.center
        stored = np.concatenate([vectors for _, vectors in index.store.vectors(48)])
        # taken from the graph's 8-bit codes: within a fraction of one quantization step of the exact mean
        assert np.allclose(mean, stored.mean(axis=0), atol=2e-3)
        results = index.search(photos / "rocket.jpg", k=5, expand=False)  # scores by rank: the query alone
    assert results[0].path == "rocket.jpg" and results[0].score == pytest.approx(1.0, abs=1e-4)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    centred_other = next(r.score for r in index_search_scores(tmp_path / "idx", photos) if r.path == "coffee.jpg")
    raw_other = next(r.score for r in raw if r.path == "coffee.jpg")
    assert centred_other != pytest.approx(raw_other, abs=1e-3)  # a different, mean-relative cosine


def index_search_scores(path, photos):
    with Index.open(path, read_only=True) as index:
        return index.search(photos / "rocket.jpg", k=len(index))


def test_an_index_from_format_2_is_migrated_to_float16_and_a_quantized_graph(tmp_path, photos, caplog):
    """Format 2 kept float32 vectors twice (SQLite and a float32 graph). Opening it for writing
    converts the stored vectors to float16, adds the removed-ids table, and rebuilds the graph."""
    import sqlite3

    from imgsim.faiss_format import validate

    with Index.create(tmp_path / "idx", model=TINY_MODEL, crop_views=()) as index:  # format 2 had none
        index.add(photos)
        before = [(r.path, r.score) for r in index.search(photos / "coffee.jpg", k=3)]
        float32 = {i: v.astype("<f4").tobytes() for i, v in index.store.vectors_by_id(
            [r.id for r in index.rows()], 48).items()}
    conn = sqlite3.connect(tmp_path / "idx.sqlite")
    with conn:  # what format 2 looked like
        conn.executemany("UPDATE vectors SET vector = ? WHERE id = ?", [(b, i) for i, b in float32.items()])
        conn.execute("DROP TRIGGER images_removed")
        conn.execute("DROP TRIGGER vectors_removed")
        conn.execute("DROP TABLE removed")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = '005_float16_vectors_and_removed_ids'")
        conn.execute("UPDATE manifest SET value = '2' WHERE key = 'format_version'")
    conn.close()
    with pytest.raises(IndexCorruptError, match="older format"):
        Index.open(tmp_path / "idx", read_only=True)
    with Index.open(tmp_path / "idx") as index:
        assert index.manifest.format_version == 3
        after = [(r.path, r.score) for r in index.search(photos / "coffee.jpg", k=3)]
        assert [p for p, _ in after] == [p for p, _ in before]
        assert np.allclose([s for _, s in after], [s for _, s in before], atol=1e-3)
        blob = index.store.conn.execute("SELECT vector FROM vectors LIMIT 1").fetchone()[0]
        assert len(blob) == 2 * 48
    assert validate((tmp_path / "idx.faiss").read_bytes(), 48) == len(float32)


def test_one_item_is_taken_where_several_may_be_given(index, photos):
    """A path where a list of paths may be given is one path, not its letters; a list of numbers is a
    vector; a label given as a string is one label."""
    outcomes = list(index.search_many(photos / "coffee.jpg", k=1))
    assert len(outcomes) == 1 and outcomes[0].results[0].path == "coffee.jpg"
    assert index.label("coffee.jpg", add="mug") == 1
    coffee = next(r for r in index.images() if r["path"] == "coffee.jpg")
    assert coffee["labels"] == ["mug"]
    assert index.label(coffee["id"], remove="mug") == 1
    vector = index.vector(coffee["id"])
    assert index.search(vector.tolist(), k=1)[0].path == "coffee.jpg"
    with pytest.raises(ImgsimError, match="must be numbers"):
        index.search(["coffee.jpg", "rocket.jpg"])
