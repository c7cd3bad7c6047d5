"""Where an index cannot be written (a read-only file system, an immutable folder, a folder this user
cannot write): every writing command is one `Error:` line that says so and that searching still
works, Python gets `ReadOnlyIndexError`, and searching works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from imgsim import Index, ReadOnlyIndexError

from .conftest import TINY_MODEL, build_index, read_only_folder, run

WRITING_COMMANDS = (["index", "{photos}"], ["rebuild"], ["verify", "--repair"], ["label", "coffee.jpg", "--add", "x"])


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@contextmanager
def read_only_mount(folder: Path):
    """`folder` as a tmpfs, filled inside the block's first part, then remounted read-only: yields a
    function that remounts it. Needs root with mount rights; skipped otherwise."""
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) to mount a read-only file system")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    def make_read_only() -> None:
        done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {done.stderr.decode().strip()}")

    try:
        yield make_read_only
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def check_refusals(where: Path, photos: Path, why: str) -> None:
    """Every writing command on the index at `where/idx`, and creating one beside it, is refused in
    one line; searching still works."""
    index = where / "idx"
    for command in WRITING_COMMANDS:
        args = [a.format(photos=photos) for a in command]
        result = run(*args, "--index", index)
        assert result.exit_code == 1, (command, result.output)
        assert error_line(result) == (f"Error: cannot write to index {index}: the folder {where} {why}; "
                                      f"it can still be searched (read-only)"), command
    new = run("index", photos, "--index", where / "new", "--model", TINY_MODEL)
    assert new.exit_code == 1
    assert error_line(new) == (f"Error: cannot create index {where / 'new'}: the folder {where} {why}; create it "
                               f"somewhere writable (indexes already there can still be searched)")
    with pytest.raises(ReadOnlyIndexError, match=why):
        Index.open(index)
    with pytest.raises(ReadOnlyIndexError, match=why):
        Index.create(where / "new2", model=TINY_MODEL)
    found = run("search", photos / "coffee.jpg", "--index", index, "-k", "1")
    assert found.exit_code == 0 and found.stdout.split()[2].endswith("coffee.jpg")
    assert run("verify", "--index", index).exit_code == 0


def test_read_only_file_system(tmp_path, photos):
    mounted = tmp_path / "media"
    with read_only_mount(mounted) as make_read_only:
        shutil.copytree(photos, mounted / "photos")
        build_index(mounted / "idx", mounted / "photos")
        make_read_only()
        before = sorted(os.listdir(mounted))
        check_refusals(mounted, mounted / "photos", "is on a read-only file system")
        assert sorted(os.listdir(mounted)) == before


def test_immutable_folder(tmp_path, photos):
    shipped = tmp_path / "dataset"
    shipped.mkdir()
    build_index(shipped / "idx", photos)
    with read_only_folder(shipped):
        check_refusals(shipped, photos, "is not writable")
        assert sorted(os.listdir(shipped)) == ["idx.faiss", "idx.sqlite"]


def as_unprivileged(*args: str, models_dir: Path) -> subprocess.CompletedProcess:
    """Run the CLI (with the tiny model) as a process that folder permissions apply to: as root, one
    without root's capabilities."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to drop root's capabilities")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    env = {**os.environ, "IMGSIM_MODELS": str(models_dir), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([*prefix, sys.executable, str(Path(__file__).with_name("tiny_model.py")), *args],
                          capture_output=True, text=True, env=env)


def test_folder_this_user_cannot_write(tmp_path, photos, tiny_model_dir):
    """`index` on an existing index, and on a new one, says that the folder is not writable (it used
    to say "attempt to write a readonly database" or "the index database is damaged")."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    build_index(folder / "idx", photos)
    os.chmod(folder, 0o555)
    try:
        existing = as_unprivileged("index", str(photos), "--index", str(folder / "idx"), models_dir=tiny_model_dir)
        assert existing.returncode == 1, existing.stderr
        assert existing.stderr.strip() == (f"Error: cannot write to index {folder / 'idx'}: the folder {folder} "
                                           f"is not writable; it can still be searched (read-only)")
        new = as_unprivileged("index", str(photos), "--index", str(folder / "new"), "--model", TINY_MODEL,
                              models_dir=tiny_model_dir)
        assert new.returncode == 1, new.stderr
        assert new.stderr.strip() == (f"Error: cannot create index {folder / 'new'}: the folder {folder} is not "
                                      f"writable; create it somewhere writable (indexes already there can still "
                                      f"be searched)")
        found = as_unprivileged("search", str(photos / "coffee.jpg"), "--index", str(folder / "idx"), "-k", "1",
                                models_dir=tiny_model_dir)
        assert found.returncode == 0 and found.stdout.split()[2].endswith("coffee.jpg"), found.stderr
        assert sorted(os.listdir(folder)) == ["idx.faiss", "idx.sqlite"]
    finally:
        os.chmod(folder, 0o755)


def test_an_index_file_this_user_cannot_write(tmp_path, photos, tiny_model_dir):
    build_index(tmp_path / "idx", photos)
    os.chmod(tmp_path / "idx.sqlite", 0o444)
    result = as_unprivileged("index", str(photos), "--index", str(tmp_path / "idx"), models_dir=tiny_model_dir)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"Error: cannot write to index {tmp_path / 'idx'}: the file "
                                     f"{tmp_path / 'idx.sqlite'} is not writable; it can still be searched (read-only)")
