"""Symbolic links, the rule: the folder indexed is resolved first (paths are stored relative to where
the files really are, so a root given through a link still moves with its index); a link whose
target lies inside the folder is skipped, since the target is indexed under its own name; a link to
a file or folder outside is followed, and its files are stored under the link's name, once."""

from __future__ import annotations

import os
import shutil
import sqlite3

from imgsim import Index

from .conftest import TINY_MODEL, build_index, run


def paths(index_path) -> list[str]:
    with Index.open(index_path, read_only=True) as index:
        return sorted(row.path for row in index.rows())


def test_root_given_through_a_link_stores_relative_paths(tmp_path, photos):
    data = tmp_path / "data"
    data.mkdir()
    real = data / "photos"
    photos.rename(real)
    home = tmp_path / "home"
    home.mkdir()
    (home / "Pictures").symlink_to(real)  # ~/Pictures -> /data/photos
    names = sorted(p.name for p in real.iterdir())
    result = run("index", home / "Pictures", "--index", data / "idx", "--model", TINY_MODEL)
    assert result.exit_code == 0, result.output
    assert paths(data / "idx") == names  # relative, not /tmp/.../home/Pictures/coffee.jpg
    with Index.open(data / "idx", read_only=True) as index:
        assert index.manifest.root == "photos" and index.root == real.resolve()
    again = run("index", home / "Pictures", "--index", data / "idx", "--json")
    assert '"unchanged": %d' % len(names) in again.stdout and '"removed": 0' in again.stdout
    assert '"unchanged": %d' % len(names) in run("index", real, "--index", data / "idx", "--json").stdout
    moved = tmp_path / "moved"
    data.rename(moved)  # the pictures and their index move together: nothing is lost
    found = run("search", moved / "photos" / "coffee.jpg", "--index", moved / "idx", "-k", "1", "--json")
    assert '"path": "coffee.jpg"' in found.stdout and str(moved / "photos" / "coffee.jpg") in found.stdout


def test_a_link_to_a_folder_inside_is_not_a_second_name(tmp_path, photos):
    (photos / "2024").mkdir()
    shutil.move(photos / "coffee.jpg", photos / "2024" / "coffee.jpg")
    (photos / "0-latest").symlink_to(photos / "2024")  # sorts before its target
    (photos / "best.jpg").symlink_to(photos / "rocket.jpg")
    (photos / "loop").symlink_to(photos)
    build_index(tmp_path / "idx", photos)
    stored = paths(tmp_path / "idx")
    assert "2024/coffee.jpg" in stored and "rocket.jpg" in stored
    assert not [p for p in stored if p.startswith(("0-latest/", "loop/")) or p == "best.jpg"]
    assert len(stored) == len([p for p in photos.rglob("*.jpg") if not p.is_symlink()])


def test_links_to_outside_are_followed_under_the_links_name_once(tmp_path, photos):
    card = tmp_path / "sdcard" / "DCIM"
    card.mkdir(parents=True)
    shutil.move(photos / "coffee.jpg", card / "coffee.jpg")
    shutil.move(photos / "rocket.jpg", card / "rocket.jpg")
    outside = tmp_path / "elsewhere.jpg"
    shutil.move(photos / "astronaut.jpg", outside)
    (photos / "phone").symlink_to(card)
    (photos / "phone-again").symlink_to(card)  # a second way to the same folder
    (photos / "a-favourite.jpg").symlink_to(card / "rocket.jpg")  # a second way to a file, sorting first
    (photos / "astronaut.jpg").symlink_to(outside)
    build_index(tmp_path / "idx", photos)
    stored = paths(tmp_path / "idx")
    assert {"phone/coffee.jpg", "a-favourite.jpg", "astronaut.jpg"} <= set(stored)
    assert not [p for p in stored if p.startswith(("phone-again/", "/")) or p == "phone/rocket.jpg"]
    with Index.open(tmp_path / "idx") as index:  # a re-run sees the same names
        report = index.sync(photos)
        assert (report.unchanged, report.added, report.removed, report.moved) == (len(stored), 0, 0, 0)


def test_an_index_made_through_an_alias_is_put_right_by_the_next_run(tmp_path, photos):
    """An index from before the rule may hold a file under a link's name: the next run moves it."""
    (photos / "2024").mkdir()
    shutil.move(photos / "coffee.jpg", photos / "2024" / "coffee.jpg")
    (photos / "0-latest").symlink_to(photos / "2024")
    build_index(tmp_path / "idx", photos)
    with sqlite3.connect(tmp_path / "idx.sqlite") as db:  # what the walk used to store
        db.execute("UPDATE images SET path = '0-latest/coffee.jpg', folder = '0-latest' "
                   "WHERE path = '2024/coffee.jpg'")
    db.close()
    with Index.open(tmp_path / "idx") as index:
        report = index.sync(photos)
        assert (report.moved, report.added, report.removed, report.embedded) == (1, 0, 0, 0)
        assert "2024/coffee.jpg" in [r.path for r in index.rows()]
        assert not [r.path for r in index.rows() if r.path.startswith("0-latest")]


def test_a_link_that_cannot_be_followed_is_reported_and_the_run_goes_on(tmp_path, photos, monkeypatch):
    """Resolving a link can fail (a link into /proc/1 for anyone but root: permission denied): the
    link is reported as skipped, with why, and everything else is indexed; a folder of queries too."""
    (photos / "guarded").symlink_to(tmp_path)
    realpath = os.path.realpath

    def refusing(path, *args, **kwargs):
        if os.fspath(path).endswith("guarded"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return realpath(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", refusing)
    result = run("index", photos, "--index", tmp_path / "idx", "--model", TINY_MODEL)
    assert result.exit_code == 0, result.output
    assert "guarded: Permission denied" in result.stderr and result.stdout.startswith("added ")
    assert len(paths(tmp_path / "idx")) == sum(1 for p in photos.iterdir() if p.is_file())
    searched = run("search", photos, "--index", tmp_path / "idx", "-k", "1")
    assert searched.exit_code == 0 and "Traceback" not in searched.output
