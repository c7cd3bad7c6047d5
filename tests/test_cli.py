"""The command line: exit codes, one-line errors, output formats, where the index is found."""

from __future__ import annotations

import json

import pytest

from imgsim import Index
from imgsim.cli import cli

from .conftest import TINY_MODEL, run


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def tiny_index(tmp_path, photos):
    index = tmp_path / "tiny"
    result = run("index", photos, "--index", index, "--model", TINY_MODEL)
    assert result.exit_code == 0, result.output
    return index


def test_index_prints_a_summary_and_json(tmp_path, photos):
    result = run("index", photos, "--index", tmp_path / "x", "--model", TINY_MODEL)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"added {len(list(photos.iterdir()))}, updated 0, moved 0, removed 0,")
    assert "images/s" in result.stdout
    again = run("index", photos, "--index", tmp_path / "x", "--json")
    summary = json.loads(again.stdout)
    assert summary["unchanged"] == len(list(photos.iterdir())) and summary["added"] == 0
    unchanged = run("index", photos, "--index", tmp_path / "x")
    assert "images/s" not in unchanged.stdout  # nothing was embedded: no rate to speak of
    (photos / "coffee.jpg").unlink()  # a file gone: kept and counted with --keep-missing, else removed
    kept = run("index", photos, "--index", tmp_path / "x", "--keep-missing")
    assert kept.exit_code == 0 and ", removed 0, kept 1 missing, unchanged " in kept.stdout
    assert json.loads(run("index", photos, "--index", tmp_path / "x", "--keep-missing", "--json").stdout)["kept"] == 1
    removed = run("index", photos, "--index", tmp_path / "x")
    assert ", removed 1, unchanged " in removed.stdout and "kept" not in removed.stdout


def test_an_empty_folder_and_an_empty_index_say_so(tmp_path, photos):
    """Nothing to index, nothing to search, a query folder with no picture: each is said on
    stderr (only the last is an error), instead of silence."""
    (tmp_path / "empty").mkdir()
    made = run("index", tmp_path / "empty", "--index", tmp_path / "idx", "--model", TINY_MODEL)
    assert made.exit_code == 0 and "no image files in" in made.stderr and "no index was made" in made.stderr
    assert not (tmp_path / "idx.sqlite").exists()  # else its root would be the empty folder, not the next one's
    Index.create(tmp_path / "idx", model=TINY_MODEL).close()  # an empty index made from Python
    again = run("index", tmp_path / "empty", "--index", tmp_path / "idx")
    assert again.exit_code == 0 and "no image files in" in again.stderr and "no index was made" not in again.stderr
    searched = run("search", photos / "coffee.jpg", "--index", tmp_path / "idx")
    assert searched.exit_code == 0 and searched.stdout == "" and "the index is empty" in searched.stderr
    listed = run("list", "--index", tmp_path / "idx")
    assert listed.exit_code == 0 and listed.stdout == "" and "the index is empty" in listed.stderr
    run("index", photos, "--index", tmp_path / "idx")
    with Index.open(tmp_path / "idx", read_only=True) as index:
        assert index.root == photos  # the first folder with pictures
    folder = run("search", tmp_path / "empty", photos / "coffee.jpg", "--index", tmp_path / "idx", "-k", "1")
    assert folder.exit_code == 1 and f"Error: no image files in {tmp_path / 'empty'}" in folder.stderr
    assert "coffee.jpg" in folder.stdout  # the other query is still answered
    for command in (["list"], ["dupes"]):
        nothing = run(*command, "--index", tmp_path / "idx", "--folder", "nosuch")
        assert nothing.exit_code == 0 and nothing.stdout == "" and "no indexed image matches the filter" in nothing.stderr
    # A destination dupes would refuse is refused before the comparing, and before anything is printed.
    inside = run("dupes", "--index", tmp_path / "idx", "--move-to", photos / "x", "--yes")
    assert inside.exit_code == 1 and inside.stdout == "" and "inside the indexed folder" in inside.stderr
    queried = run("search", tmp_path / "empty", "no\nsuch.jpg", "--index", tmp_path / "idx")  # each error one line
    assert queried.exit_code == 1 and len(queried.stderr.strip().splitlines()) == 2 and "no\\x0asuch.jpg" in queried.stderr
    named = run("similar", "no\nsuch.jpg", "--index", tmp_path / "idx")
    assert named.exit_code == 1 and error_line(named) == "Error: no\\x0asuch.jpg is not in this index (see `imgsim list`; `imgsim search` takes any picture)"


def test_search_plain_and_json(tiny_index, photos):
    plain = run("search", photos / "coffee.jpg", "--index", tiny_index, "-k", "3")
    assert plain.exit_code == 0
    first = plain.stdout.splitlines()[0].split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-4)
    assert first[2].endswith("coffee.jpg")
    rows = [json.loads(line) for line in run("search", photos / "coffee.jpg", "--index", tiny_index, "--json").stdout.splitlines()]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["path"] == "coffee.jpg" and rows[0]["query"].endswith("coffee.jpg")
    # --no-expand: ranked by the query alone, scores falling down the list; the same first result
    alone = [json.loads(line) for line in run("search", photos / "coffee.jpg", "--index", tiny_index, "--json",
                                              "--no-expand").stdout.splitlines()]
    assert alone[0]["id"] == rows[0]["id"] and sorted(r["id"] for r in alone) == sorted(r["id"] for r in rows)
    assert [r["score"] for r in alone] == sorted((r["score"] for r in alone), reverse=True)
    similar = run("similar", "coffee.jpg", "--index", tiny_index, "--json", "--no-expand", "-k", "3")
    assert [json.loads(line)["score"] for line in similar.stdout.splitlines()] == pytest.approx(
        [r["score"] for r in alone[1:4]], abs=1e-3)  # the stored vector is float16


def test_info_json(tiny_index, photos):
    data = json.loads(run("info", "--index", tiny_index, "--json").stdout)
    assert data["count"] == len(list(photos.iterdir()))
    assert data["model"] == TINY_MODEL and data["dimensions"] == 48
    assert data["faiss_bytes"] > 0 and data["sqlite_bytes"] > 0
    assert data["root"] == str(photos)


def test_index_path_from_environment_and_default(tmp_path, photos, monkeypatch):
    env_index = tmp_path / "from-env"
    assert run("index", photos, "--model", TINY_MODEL, env={"IMGSIM_INDEX": str(env_index)}).exit_code == 0
    assert (tmp_path / "from-env.sqlite").exists() and (tmp_path / "from-env.faiss").exists()
    monkeypatch.chdir(tmp_path)
    assert run("index", photos, "--model", TINY_MODEL).exit_code == 0
    assert (tmp_path / "imgsim.sqlite").exists()
    assert run("info").exit_code == 0


def test_index_file_suffix_is_accepted(tiny_index):
    assert run("info", "--index", f"{tiny_index}.faiss").exit_code == 0
    assert run("info", "--index", f"{tiny_index}.sqlite").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["index", "{tmp}/nowhere", "--index", "{tmp}/i"], "Error: image folder {tmp}/nowhere does not exist"),
    (["search", "{photos}/coffee.jpg", "--index", "{tmp}/missing"], "Error: no index at {tmp}/missing"),
    (["info", "--index", "{tmp}/missing"], "Error: no index at {tmp}/missing"),
    (["index", "{photos}", "--index", "{tmp}/i", "--model", "vgg99"], "Error: unknown model 'vgg99'"),
    (["info", "--index", "."], "Error: index name '.' names a folder, not index files"),
    (["info", "--index", ""], "Error: index name '' names a folder"),
    (["list", "--index", "/"], "Error: index name '/' names a folder"),
    (["index", "{photos}", "--index", ".."], "Error: index name '..' names a folder"),
    (["index", "{photos}", "--index", "{tmp}/"], "Error: index name '{tmp}/' names a folder"),
    (["info", "--index", "{tmp}/."], "Error: index name '{tmp}/.' names a folder"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, photos, args, message):
    fill = {"tmp": tmp_path, "photos": photos}
    result = run(*[a.format(**fill) for a in args])
    assert result.exit_code == 1
    assert error_line(result).startswith(message.format(**fill))
    assert not (tmp_path / "i.sqlite").exists()


def test_query_that_is_not_an_image(tiny_index, tmp_path):
    query = tmp_path / "notes.jpg"
    query.write_text("just text")
    result = run("search", query, "--index", tiny_index)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: cannot read query {query}: not an image (unrecognised format)"
    missing = run("search", tmp_path / "nope.jpg", "--index", tiny_index)
    assert missing.exit_code == 1 and "No such file" in error_line(missing)


def test_model_cannot_change_on_an_existing_index(tiny_index, photos):
    result = run("index", photos, "--index", tiny_index, "--model", "efficientnet-lite0")
    assert result.exit_code == 1
    assert "was made with tiny-test, not efficientnet-lite0" in error_line(result)


def test_bad_k_is_a_usage_error(tiny_index, photos):
    result = run("search", photos / "coffee.jpg", "--index", tiny_index, "-k", "0")
    assert result.exit_code == 2


def test_every_command_has_help():
    for name, command in cli.commands.items():
        assert command.help, name
        assert run(name, "--help").exit_code == 0


def test_python_dash_m_imgsim_is_the_command_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "imgsim", "info", "--index", tmp_path / "none"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("Error: ") and "none" in done.stderr, done.stderr
    assert subprocess.run([sys.executable, "-m", "imgsim", "--help"], capture_output=True, text=True,
                          timeout=120).stdout.startswith("Usage: ")


def test_verify_errors_rebuild_and_root(tiny_index, photos, tmp_path):
    assert run("verify", "--index", tiny_index).stdout.strip().endswith(f"ok: {len(list(photos.glob('*.jpg')))} images")
    faiss_file = tmp_path / "tiny.faiss"
    faiss_file.write_bytes(b"garbage" * 100)
    broken = run("verify", "--index", tiny_index)
    assert broken.exit_code == 1 and "problem: " in broken.stdout and "does not match its manifest" in broken.stdout
    repaired = run("verify", "--index", tiny_index, "--repair")
    assert repaired.exit_code == 0 and "repaired: rebuilt tiny.faiss" in repaired.stdout
    assert run("verify", "--index", tiny_index).exit_code == 0
    assert run("rebuild", "--index", tiny_index).stdout.startswith("rebuilt ")
    assert run("errors", "--index", tiny_index).stdout == ""
    moved = tmp_path / "moved"
    photos.rename(moved)
    note = run("verify", "--index", tiny_index)
    assert note.exit_code == 0 and "indexed files are not on disk" in note.stdout
    assert "not on disk" not in run("verify", "--index", tiny_index, "--root", moved).stdout
    found = run("search", moved / "coffee.jpg", "--index", tiny_index, "--root", moved, "-k", "1")
    assert found.stdout.split()[2] == str(moved / "coffee.jpg")


def test_reading_an_index_leaves_no_files_behind(tiny_index, photos, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run("search", photos / "coffee.jpg", "--index", tiny_index).exit_code == 0
    assert run("info", "--index", tiny_index).exit_code == 0
    assert run("verify", "--index", tiny_index).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not [name for name in before if name.endswith(("-wal", "-shm"))]
