"""What a new user hit (issue 9): each rough edge, pinned down by a test that failed before its fix."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from imgsim import ImgsimError, Index

from .conftest import TINY_MODEL, build_index, run


def n_photos(folder) -> int:
    return len(list(folder.glob("*.jpg")))


@pytest.fixture
def tiny_index(tmp_path, photos):
    return build_index(tmp_path / "idx", photos)


# -- the Python API ------------------------------------------------------------------------------
def test_search_with_any_vector_scores_within_cosine_range(tiny_index):
    rng = np.random.default_rng(3)
    with Index.open(tiny_index, read_only=True) as index:
        assert not index.graph.centred  # the uncentred path is the one that skipped normalising
        v = rng.normal(size=index.manifest.dim).astype(np.float32) * 7
        for query in (v, 3 * v, v.astype(np.float64), 1e-6 * v):
            scores = [r.score for r in index.search(query, k=5)]
            assert all(-1.0 <= s <= 1.0 for s in scores), scores
        assert [r.id for r in index.search(3 * v, k=5)] == [r.id for r in index.search(v, k=5)]
        assert index.search(3 * v, k=5)[0].score == pytest.approx(index.search(v, k=5)[0].score, abs=1e-5)
        zero, nan = np.zeros(index.manifest.dim, np.float32), np.full(index.manifest.dim, np.nan, np.float32)
        for bad in (zero, nan):
            with pytest.raises(ImgsimError, match="finite and not all zeros"):
                index.search(bad, k=1)


def test_add_expands_the_home_folder(tmp_path, photos, monkeypatch):
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True)
    for name in ("coffee.jpg", "rocket.jpg"):
        (home / "Pictures" / name).write_bytes((photos / name).read_bytes())
    monkeypatch.setenv("HOME", str(home))
    with Index.create(tmp_path / "idx", model=TINY_MODEL) as index:
        report = index.add("~/Pictures")
        assert report.added == 2
        assert sorted(r.path for r in index.rows()) == ["coffee.jpg", "rocket.jpg"]
        assert index.root == (home / "Pictures").resolve()


def test_a_failed_first_add_leaves_no_index_behind(tmp_path, photos):
    path = tmp_path / "idx"
    with pytest.raises(ImgsimError, match="does not exist"):
        with Index.create(path, model=TINY_MODEL) as index:
            index.add(tmp_path / "no-such-folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    with Index.create(path, model=TINY_MODEL) as index:  # the retry starts afresh
        assert index.add(photos).added == n_photos(photos)


# -- the command line ----------------------------------------------------------------------------
def test_quiet_is_accepted_after_every_command(tmp_path):
    from imgsim.cli import cli

    for name, command in cli.commands.items():
        assert "--quiet" in [opt for p in command.params for opt in p.opts], name


def test_quiet_after_the_command_silences_skipped_lines_and_notices(tmp_path, photos):
    (photos / "broken.jpg").write_bytes(b"not a picture")
    loud = run("index", photos, "--index", tmp_path / "loud", "--model", TINY_MODEL)
    assert "skipped " in loud.stderr and "model: " not in loud.stderr  # --model given: no model notice
    result = run("index", photos, "--index", tmp_path / "i", "--model", TINY_MODEL, "-q")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith(f"added {n_photos(photos) - 1},")
    (tmp_path / "i.faiss").unlink()
    search = run("search", photos / "coffee.jpg", "--index", tmp_path / "i", "-k", "1", "-q")
    assert search.exit_code == 0 and search.stderr == "" and search.stdout.count("\n") == 1
    notice = run("search", photos / "coffee.jpg", "--index", tmp_path / "i", "-k", "1")
    assert "i.faiss is missing" in notice.stderr


def test_search_json_has_the_stored_path_and_the_absolute_one(tiny_index, photos):
    result = run("search", photos / "coffee.jpg", "--index", tiny_index, "-k", "3", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["path"] == "coffee.jpg"
    assert rows[0]["abspath"] == str(photos.resolve() / "coffee.jpg")
    plain = run("search", photos / "coffee.jpg", "--index", tiny_index, "-k", "3")
    assert [line.split()[2] for line in plain.stdout.splitlines()] == [r["abspath"] for r in rows]


def test_info_prints_a_date_and_zero_bytes_per_image_when_empty(tmp_path):
    Index.create(tmp_path / "empty", model=TINY_MODEL).close()
    data = json.loads(run("info", "--index", tmp_path / "empty", "--json").stdout)
    assert data["count"] == 0 and data["bytes_per_image"] == 0
    created = datetime.strptime(data["created"], "%Y-%m-%dT%H:%M:%S%z")
    assert abs(created.timestamp() - datetime.now().timestamp()) < 600
    plain = run("info", "--index", tmp_path / "empty").stdout
    assert "bytes_per_image: 0\n" in plain
    assert re.search(r"^created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", plain, re.MULTILINE)


def test_verify_repair_writes_a_deleted_faiss_file(tiny_index, photos):
    faiss_file = tiny_index.with_suffix(".faiss")
    faiss_file.unlink()
    result = run("verify", "--index", tiny_index, "--repair")
    assert result.exit_code == 0
    assert "repaired: wrote idx.faiss from the stored vectors (it was missing)" in result.stdout
    assert faiss_file.exists()
    with Index.open(tiny_index, read_only=True) as index:
        assert index.verify().notes == []
        assert len(index.graph) == n_photos(photos)


def test_a_read_only_open_that_rebuilds_says_once_how_to_keep_it(tiny_index, photos, caplog):
    tiny_index.with_suffix(".faiss").unlink()
    with caplog.at_level(logging.INFO, logger="imgsim"):
        with Index.open(tiny_index, read_only=True) as index:
            for _ in range(3):
                index.search(photos / "coffee.jpg", k=1)
    assert caplog.text.count("verify --repair") == 1
    assert not tiny_index.with_suffix(".faiss").exists()  # read-only wrote nothing
    result = run("search", photos / "coffee.jpg", photos / "rocket.jpg", "--index", tiny_index, "-k", "1")
    assert result.stderr.count("run `imgsim verify --repair`") == 1


def test_one_unreadable_query_among_good_ones(tiny_index, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture")
    result = run("search", photos / "coffee.jpg", bad, photos / "rocket.jpg", "--index", tiny_index, "-k", "1")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: cannot read query {bad}: not an image (unrecognised format)"
    found = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("  1")]
    assert [p.rsplit("/", 1)[1] for p in found] == ["coffee.jpg", "rocket.jpg"]
    as_json = run("search", photos / "coffee.jpg", bad, "--index", tiny_index, "-k", "1", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["path"] == "coffee.jpg"


def test_index_folder_that_does_not_exist_is_named_as_the_index_folder(tmp_path, photos):
    result = run("index", photos, "--index", tmp_path / "nowhere" / "idx", "--model", TINY_MODEL)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: cannot create index {tmp_path / 'nowhere' / 'idx'}: "
                                     f"the index folder {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_a_root_that_does_not_exist_is_an_error(tiny_index, photos, tmp_path):
    result = run("search", photos / "coffee.jpg", "--index", tiny_index, "--root", tmp_path / "gone")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"Error: root folder {tmp_path / 'gone'} does not exist: give the folder "
                                     f"the indexed images are in now")
    for command in (["verify"], ["list"]):
        assert run(*command, "--index", tiny_index, "--root", tmp_path / "gone").exit_code == 1
    with pytest.raises(ImgsimError, match="does not exist"):
        Index.open(tiny_index, read_only=True, root=tmp_path / "gone")


# -- files that failed ---------------------------------------------------------------------------
def test_unchanged_failed_files_are_counted_not_retried(tmp_path, photos):
    (photos / "broken.jpg").write_bytes(b"not a picture")
    (photos / "empty.png").write_bytes(b"")
    index = tmp_path / "i"
    first = run("index", photos, "--index", index, "--model", TINY_MODEL, "--json")
    assert json.loads(first.stdout)["failed"] == 2 and first.stderr.count("skipped ") == 2
    again = run("index", photos, "--index", index)
    assert again.exit_code == 0 and again.stderr == ""  # quiet: nothing was tried
    assert again.stdout.startswith(f"added 0, updated 0, moved 0, removed 0, unchanged {n_photos(photos) - 1}, "
                                   f"failed 0, known failures 2 in ")
    summary = json.loads(run("index", photos, "--index", index, "--json").stdout)
    assert (summary["failed"], summary["known_failures"]) == (0, 2)
    listed = run("errors", "--index", index).stdout.splitlines()
    assert sorted(line.split(": ")[0].rsplit("/", 1)[1] for line in listed) == ["broken.jpg", "empty.png"]
    assert run("index", photos, "--index", index, "--strict").exit_code == 3  # still not indexed
    retried = json.loads(run("index", photos, "--index", index, "--retry-failed", "--json").stdout)
    assert (retried["failed"], retried["known_failures"]) == (2, 0)
    assert len(run("errors", "--index", index).stdout.splitlines()) == 2


def test_a_failed_file_that_changes_is_tried_again(tmp_path, photos):
    broken = photos / "broken.jpg"
    broken.write_bytes(b"not a picture")
    with Index.create(tmp_path / "i", model=TINY_MODEL) as index:
        assert index.sync(photos).failed == 1
        assert (index.sync(photos).failed, index.sync(photos).known_failures) == (0, 1)
        broken.write_bytes(b"still not a picture")  # another size: tried, and fails again
        report = index.sync(photos)
        assert (report.failed, report.known_failures) == (1, 0)
        Image.new("RGB", (40, 30), "red").save(broken)
        report = index.sync(photos)
        assert (report.added, report.failed, report.known_failures) == (1, 0, 0)
        assert index.errors() == []


def test_a_broken_link_is_a_known_failure_until_it_changes(tmp_path, photos):
    """As any failed file: said once, then counted, not tried and said at every run; tried again once
    it points somewhere (a picture now) or is made again."""
    link = photos / "gone.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    with Index.create(tmp_path / "i", model=TINY_MODEL) as index:
        first = index.sync(photos)
        assert first.failed == 1 and first.failures[0][1] == "broken symbolic link"
        again = index.sync(photos)
        assert (again.failed, again.known_failures) == (0, 1)
        link.unlink()
        link.symlink_to(tmp_path / "elsewhere.jpg")  # made again, still broken: tried, and said, again
        remade = index.sync(photos)
        assert (remade.failed, remade.known_failures) == (1, 0)
        Image.new("RGB", (40, 30), "blue").save(tmp_path / "elsewhere.jpg")
        fixed = index.sync(photos)
        assert (fixed.added, fixed.failed, fixed.known_failures) == (1, 0, 0) and index.errors() == []


def test_add_leaves_known_failures_alone_and_retry_failed_tries_them(tmp_path, photos):
    broken = photos / "broken.jpg"
    broken.write_bytes(b"x" * 100)
    with Index.create(tmp_path / "i", model=TINY_MODEL) as index:
        assert index.sync(photos).failed == 1
        assert index.add(photos).known_failures == 1  # add leaves it alone too
        report = index.sync(photos, retry_failed=True)
        assert (report.failed, report.known_failures) == (1, 0)


def test_an_index_from_before_failure_stats_is_read_and_upgraded(tmp_path, photos):
    """Readers need no upgrade for it (a shipped index stays searchable); the first writer adds it."""
    (photos / "broken.jpg").write_bytes(b"not a picture")
    build_index(tmp_path / "i", photos)
    with sqlite3.connect(tmp_path / "i.sqlite") as db:
        db.execute("DELETE FROM _sqlite_migrations WHERE name = '003_error_file_stat'")
        for column in ("size", "mtime_ns", "ctime_ns"):
            db.execute(f"ALTER TABLE errors DROP COLUMN {column}")
    db.close()
    with Index.open(tmp_path / "i", read_only=True) as index:
        assert len(index.errors()) == 1 and index.search(photos / "coffee.jpg", k=1)[0].path == "coffee.jpg"
    with Index.open(tmp_path / "i") as index:
        assert index.sync(photos).failed == 1  # no stat was kept: tried once more
        assert index.sync(photos).known_failures == 1


def test_an_empty_path_is_refused_not_taken_for_the_working_folder(tmp_path, photos, monkeypatch):
    """`imgsim index "$UNSET"` indexed (and `search ""` searched) every picture under the folder it
    was run from: Path("") is ".". Found by the trial of issue 13's round."""
    index = build_index(tmp_path / "idx", photos)
    monkeypatch.chdir(photos)  # pictures in the working folder, which an empty path used to reach
    with Index.open(index, read_only=True) as opened:
        before = len(opened)
    result = run("index", "", "--index", tmp_path / "other")
    assert result.exit_code == 1 and "the path is empty" in result.stderr
    assert not (tmp_path / "other.sqlite").exists()
    good = sorted(photos.glob("*.jpg"))[0]
    result = run("search", "", good, "--index", index, "-k", "1", "--json")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "the path is empty" in result.stderr
    assert {json.loads(line)["query"] for line in result.stdout.splitlines()} == {str(good)}  # answered
    for command in (("similar", ""), ("label", "", "--add", "x")):
        result = run(*command, "--index", index)
        assert result.exit_code == 1 and "the path is empty" in result.stderr, command
    with Index.open(index, read_only=True) as opened:
        assert len(opened) == before
        with pytest.raises(ImgsimError, match="the path is empty"):
            opened.similar("")


# -- found by the ninth round's new-user trial ---------------------------------------------------
def test_options_out_of_range_are_usage_errors_before_any_work(tiny_index, photos, tmp_path):
    """A score cut no cosine can pass, --against-reference alone, a page in a folder that is not
    there: each one usage line (exit 2), before anything is searched or printed."""
    for command in (["search", photos / "coffee.jpg"], ["similar", "coffee.jpg"]):
        for bad in ("2", "-1.5"):
            result = run(*command, "--index", tiny_index, "--min-score", bad)
            assert result.exit_code == 2 and result.stdout == "" and "--min-score" in result.stderr, result.stderr
        assert run(*command, "--index", tiny_index, "--min-score", "0.5").exit_code == 0
        page = run(*command, "--index", tiny_index, "--html", tmp_path / "nosuch" / "page.html")
        assert page.exit_code == 2 and page.stdout == "" and "does not exist" in page.stderr, page.stderr
    alone = run("dupes", "--index", tiny_index, "--against-reference")
    assert alone.exit_code == 2 and "--against-reference needs at least one --reference folder" in alone.stderr
    page = run("dupes", "--index", tiny_index, "--html", tmp_path / "nosuch" / "page.html")
    assert page.exit_code == 2 and page.stdout == ""


def test_an_empty_first_folder_does_not_become_the_root(tmp_path, photos):
    """From Python as from the command line: the root is the first folder that has pictures."""
    (tmp_path / "empty").mkdir()
    with Index.create(tmp_path / "idx", model=TINY_MODEL) as index:
        assert index.add(tmp_path / "empty").added == 0 and index.root is None
        assert index.add(photos).added == n_photos(photos) and index.root == photos
        assert all(not r.path.startswith("/") for r in index.rows())
    with Index.create(tmp_path / "several", model=TINY_MODEL) as index:  # several sources, the empty one first
        assert index.add([tmp_path / "empty", photos]).added == n_photos(photos) and index.root == photos


def test_small_messages_a_new_user_met(tiny_index, photos, tmp_path):
    """A file given to `imgsim index`, an index with no failures, a malformed --sha256: each says what
    is wrong, or that there is nothing to show."""
    file = photos / "coffee.jpg"
    result = run("index", file, "--index", tmp_path / "f")
    assert result.exit_code == 1 and f"Error: {file} is a file: `imgsim index` takes the folder" in result.stderr
    assert not (tmp_path / "f.sqlite").exists()
    empty = run("errors", "--index", tiny_index)
    assert empty.exit_code == 0 and empty.stdout == "" and empty.stderr == "no file failed to index\n"
    assert run("errors", "--index", tiny_index, "-q").stderr == ""
    bad = run("models", "add", "resnet50", "--url", "http://127.0.0.1:9/x.onnx", "--sha256", "00")
    assert bad.exit_code == 2 and "is not a sha256: 64 hexadecimal digits" in bad.stderr


def test_a_reader_during_the_first_indexing_is_told_a_writer_is_at_work_not_that_a_file_is_missing(
        tmp_path, photos, caplog):
    with Index.create(tmp_path / "first", model=TINY_MODEL, crop_views=()) as writer:
        from imgsim.store import NewImage

        with writer.store.transaction():
            writer.store.insert([NewImage("a.jpg", 1, 1, "0" * 64, 8, 8, "JPEG", np.ones(48, np.float32) / 48 ** 0.5)])
        with caplog.at_level(logging.WARNING, logger="imgsim"), \
                Index.open(tmp_path / "first", read_only=True) as reader:
            assert reader.search(np.ones(48, np.float32), k=1)[0].path == "a.jpg"
        said = [r.getMessage() for r in caplog.records]
        assert any("another process is indexing" in m for m in said) and not any("missing" in m for m in said), said
