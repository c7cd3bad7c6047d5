"""Filters, labels, listing, search by an indexed image, and --exclude, with the tiny model: filtered
searches must agree with an exact search followed by filtering, hostile values must match nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imgsim import Filter, ImgsimError, Index
from imgsim import graph as graph_module

from .conftest import TINY_MODEL, build_index, run, use_tiny_model


@pytest.fixture(scope="module")
def library(tmp_path_factory, photos_master):
    """Photos spread over folders (trips/2023, trips/2024, scans), some as PNG, one with EXIF."""
    root = tmp_path_factory.mktemp("filters") / "library"
    photos = photos_master
    names = sorted(p.name for p in photos.glob("*.jpg"))
    for i, name in enumerate(names):
        folder = root / ("trips/2023", "trips/2024", "scans")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(photos / name) as img:
            if i % 4 == 0:
                img.save(folder / (name[:-4] + ".png"))
            else:
                shutil.copy(photos / name, folder / name)
    with Image.open(photos / names[0]) as img:  # a camera photo: EXIF capture time and model
        exif = Image.Exif()
        exif[0x0110] = "PhoneCam 12"
        exif[0x010F] = "Acme"
        exif.get_ifd(0x8769)[0x9003] = "2019:07:14 10:30:00"
        img.save(root / "trips/2023/camera-shot.jpg", exif=exif)
    return root


@pytest.fixture(scope="module")
def built(library, tiny_model_dir):
    path = library.parent / "idx"
    with pytest.MonkeyPatch.context() as mp:
        use_tiny_model(mp, tiny_model_dir)
        with Index.create(path, model=TINY_MODEL) as idx:
            idx.add(library, label_from_folder=True)
    return path


@pytest.fixture
def index(built):
    """The library's index, open read-only (tests that write use `writable`)."""
    with Index.open(built, read_only=True) as idx:
        yield idx


@pytest.fixture
def writable(built, request):
    """A private copy of the library's index (beside the library, as the root is stored relative)."""
    copy = built.with_name(request.node.name[:40])
    for suffix in (".sqlite", ".faiss"):
        shutil.copy(built.with_suffix(suffix), copy.with_suffix(suffix))
    return copy


def matching_ids(index, flt: Filter) -> set[int]:
    return {r["id"] for r in index.images(flt)}


def exact_then_filter(index, query, flt: Filter, k: int) -> list[int]:
    everything = index.search(query, k=len(index), exact=True, expand=False)
    keep = matching_ids(index, flt)
    return [r.id for r in everything if r.id in keep][:k]


FILTERS = [
    Filter(folders=("trips",)),
    Filter(folders=("trips/2024",)),
    Filter(labels=("scans",)),
    Filter(formats=("png",)),
    Filter(formats=("jpg",), folders=("trips/2023",)),
    Filter(min_width=500),
    Filter(min_width=500, min_height=400, formats=("jpeg", "png")),
    Filter(since="2019", until="2019-12"),
    Filter(folders=("scans",), min_width=100000),  # matches nothing
]


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: repr(f)[7:60])
@pytest.mark.parametrize("graph_walk", [False, True], ids=["exact-subset", "graph-walk"])
def test_filtered_search_agrees_with_exact_search_then_filtering(index, library, flt, graph_walk, monkeypatch):
    if graph_walk:  # force the IDSelector walk even for selective filters
        monkeypatch.setattr(graph_module, "EXACT_FILTER_LIMIT", 0)
    query = next(library.rglob("*.jpg"))
    for k in (1, 3, 50):
        got = [r.id for r in index.search(query, k=k, filter=flt, expand=False)]  # ranked by the query alone
        want = exact_then_filter(index, query, flt, k)
        assert got == want
        expanded = [r.id for r in index.search(query, k=k, filter=flt)]  # expanded: the same first one
        for ids in (got, expanded):
            assert len(ids) == min(k, len(matching_ids(index, flt)))  # never short while k images match
            assert all(i in matching_ids(index, flt) for i in ids)
        assert expanded[:1] == got[:1]


def test_min_score_ef_and_exact(index, library):
    query = next(library.rglob("*.jpg"))
    results = index.search(query, k=len(index))
    cut = results[3].score
    # scores need not fall steadily down an expanded ranking: the cut keeps, in order, those at or above it
    assert [r.id for r in index.search(query, k=len(index), min_score=cut)] == \
        [r.id for r in results if r.score >= cut]
    assert [r.id for r in index.search(query, k=5, exact=True)] == [r.id for r in results[:5]]
    assert [r.id for r in index.search(query, k=5, ef=5)][0] == results[0].id


def test_an_empty_result_says_why_on_stderr(index, library, tmp_path):
    """Not an error (exit code 0, nothing on stdout), but not silence either; -q keeps it quiet."""
    query = next(library.rglob("*.jpg"))
    target = next(iter(index.rows()))
    noise = tmp_path / "noise.png"  # no indexed copy: nothing scores 1
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    for args, why in ((("search", query, "--folder", "nowhere"), "no indexed image matches the filter"),
                      (("similar", target.path, "--label", "nothing-has-this"), "no indexed image matches the filter"),
                      (("search", noise, "--min-score", "1"), "no result scores at least 1.0")):
        result = run(*args, "--index", index.sqlite_path)
        assert result.exit_code == 0 and result.stdout == "" and why in result.stderr, result.stderr
        quiet = run(*args, "--index", index.sqlite_path, "-q")
        assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    found = run("search", query, "--index", index.sqlite_path, "--folder", target.folder or ".")
    assert found.exit_code == 0 and found.stdout and "no " not in found.stderr


HOSTILE = ["' OR 1=1 --", "%", "_", "*", "trips%", "trips/_0_3", "\"; DROP TABLE images; --", "..", "../..",
           "trips/2023' OR 'a'='a", "\\", "\x00", "scans/../trips"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_filter_values_match_nothing_and_break_nothing(index, library, value):
    count = len(index)
    query = next(library.rglob("*.jpg"))
    for flt in (Filter(folders=(value,)), Filter(labels=(value,))):
        if flt.folders == ("",):  # "..", "\\" and the like normalise to the root: everything, which is right
            continue
        assert index.search(query, k=5, filter=flt) == []
        assert list(index.images(flt)) == []
    with pytest.raises(ImgsimError, match="image format"):  # no such format: refused
        Filter(formats=(value,))
    assert len(index) == count and index.verify().ok
    result = run("search", query, "--index", index.sqlite_path, "--folder", value, "--label", value, "--json")
    assert result.exit_code == 0 and result.stdout == ""


def test_bad_filter_values_are_clear_errors(index, library):
    for kwargs, message in [({"since": "yesterday"}, "not a date"), ({"until": "2024-13"}, "the month is 13: 01 to 12"),
                            ({"since": "2024-02-30"}, r"2024-02 has days 01 to 29\)"),
                            ({"until": "2023-02-29"}, "2023-02 has days 01 to 28"),
                            ({"since": "2024-04-31"}, "not a date: '2024-04-31'"),
                            ({"since": "2024-04-30T24:00"}, r"\(the time is 24:00: at most 23:59:59\)"),
                            ({"until": "2024-02-29T25:00"}, r"\(the time is 25:00: at most"),  # as typed
                            ({"formats": ("exe",)}, "unknown image format"),
                            ({"min_width": -1}, "min-width"), ({"labels": ("",)}, "label")]:
        with pytest.raises(ImgsimError, match=message):
            Filter(**kwargs)
    assert Filter(until="2024-02").until == "2024-02-29T23:59:59" and Filter(until="2023-02").until.startswith("2023-02-28")
    assert Filter(formats=("mpo", "heic", ".PNG")).formats == ("MPO", "HEIF", "PNG")
    query = next(library.rglob("*.jpg"))
    for option in (["--since", "last week"], ["--until", "2024-02-30"], ["--format", "exe"], ["--min-score", "nan"],
                   ["--json", "--csv"]):  # misused options: exit 2, as click's own
        result = run("search", query, "--index", index.sqlite_path, *option)
        assert result.exit_code == 2 and "Error: " in result.stderr, (option, result.output)
    with pytest.raises(ImgsimError, match="min_score"):
        index.search(query, min_score=float("nan"))


def test_metadata_is_stored_and_listed(index, library):
    records = {r["path"]: r for r in index.images()}
    shot = records["trips/2023/camera-shot.jpg"]
    assert (shot["folder"], shot["name"], shot["taken"], shot["camera"]) == \
        ("trips/2023", "camera-shot.jpg", "2019-07-14T10:30:00", "Acme PhoneCam 12")
    assert shot["date"] == "2019-07-14T10:30:00" and shot["labels"] == ["2023"]
    other = next(r for p, r in records.items() if p.startswith("scans/"))
    assert other["taken"] is None and other["date"][:4] >= "2024" and other["labels"] == ["scans"]
    assert {r["format"] for r in records.values()} == {"JPEG", "PNG"}

    listed = run("list", "--index", index.sqlite_path, "--folder", "trips/2023", "--json")
    paths = [json.loads(line)["path"] for line in listed.stdout.splitlines()]
    assert paths == sorted(p for p in records if p.startswith("trips/2023/"))
    table = run("list", "--index", index.sqlite_path, "--format", "png", "--csv")
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert rows and all(r["format"] == "PNG" for r in rows) and {"id", "path", "abspath", "labels"} <= set(rows[0])
    plain = run("list", "--index", index.sqlite_path, "--since", "2019-07-14", "--until", "2019-07-14")
    assert plain.stdout.strip().endswith("trips/2023/camera-shot.jpg") and len(plain.stdout.splitlines()) == 1


def test_labels_are_added_and_removed_and_filter(writable, library):
    path = writable
    assert run("label", library / "scans", "--add", "paper", "--index", path).stdout.startswith("labelled ")
    assert run("label", "trips/2024", "--add", "paper", "--add", "keep", "--index", path).exit_code == 0
    with Index.open(path, read_only=True) as idx:
        paper = matching_ids(idx, Filter(labels=("paper",)))
        assert paper == matching_ids(idx, Filter(folders=("scans", "trips/2024")))
    first = next(iter(sorted(paper)))
    removed = run("label", str(first), "--remove", "paper", "--index", path)
    assert removed.exit_code == 0 and removed.stdout == "unlabelled 1 image\n"
    # what changed is counted, not what was named: a label it lacks, or one it has already
    again = run("label", str(first), "--remove", "paper", "--index", path)
    assert again.exit_code == 0 and again.stdout == "unlabelled 0 images\n"
    assert run("label", str(first), "--add", "paper", "--index", path).stdout == "labelled 1 image\n"
    assert run("label", str(first), "--add", "paper", "--index", path).stdout == "labelled 0 images\n"
    assert run("label", str(first), "--remove", "paper", "--index", path).stdout == "unlabelled 1 image\n"
    both = run("label", str(first), "--add", "paper", "--remove", "paper", "--index", path)
    assert both.exit_code == 2 and "'paper' is given to both --add and --remove" in both.stderr
    with Index.open(path) as idx, pytest.raises(ImgsimError, match="both added and removed"):
        idx.label([first], add=["x"], remove=["x"])
    with Index.open(path, read_only=True) as idx:
        assert matching_ids(idx, Filter(labels=("paper",))) == paper - {first}
        assert matching_ids(idx, Filter(labels=("keep",))) == matching_ids(idx, Filter(folders=("trips/2024",)))
        # search results carry each image's labels, sorted (from the one query that reads their rows)
        shown = {r.id: r.labels for r in idx.search(np.ones(idx.manifest.dim, np.float32), k=len(idx), expand=False)}
        assert len(shown) == len(idx) and any(len(labels) >= 2 for labels in shown.values())
        assert shown == {i: tuple(labels) for i, labels in idx.store.labels_by_id(list(shown)).items()} | \
            {i: () for i in shown if not idx.store.labels_by_id([i])}
        assert all(list(labels) == sorted(labels) for labels in shown.values())
    missing = run("label", "nowhere.jpg", "--add", "x", "--index", path)
    assert missing.exit_code == 1 and "not in this index" in missing.stderr
    assert run("label", "scans", "--index", path).exit_code == 2  # neither --add nor --remove
    empty = run("label", "scans", "--add", "", "--index", path)  # a misused option, as click's own: exit 2
    assert empty.exit_code == 2 and "Invalid value for --add: a label must be non-empty text" in empty.stderr


def test_similar_uses_the_stored_vector_and_leaves_the_image_out(index, library):
    target = next(r for r in index.rows() if r.path.endswith(".jpg"))
    by_path = index.similar(target.path, k=4)
    by_id = index.similar(target.id, k=4)
    by_file = index.similar(index.resolve(target.path), k=4)
    assert [r.id for r in by_path] == [r.id for r in by_id] == [r.id for r in by_file]
    # by the query alone, the same as searching with the file and leaving it out (expanded, `similar`
    # expands with its best match other than itself, a search with the file with the file itself)
    alone = index.similar(target.id, k=4, expand=False)
    searched = [r for r in index.search(index.resolve(target.path), k=5, expand=False) if r.id != target.id][:4]
    assert [r.id for r in alone] == [r.id for r in searched] and alone[0].id == by_id[0].id
    assert target.id not in [r.id for r in by_path] and [r.rank for r in by_path] == [1, 2, 3, 4]
    filtered = index.similar(target.id, k=3, filter=Filter(formats=("png",)))
    assert filtered and all(r.format == "PNG" for r in filtered)
    cli = run("similar", str(target.id), "--index", index.sqlite_path, "-k", "4", "--json")
    assert [json.loads(line)["id"] for line in cli.stdout.splitlines()] == [r.id for r in by_path]
    bad = run("similar", "999999", "--index", index.sqlite_path)
    assert bad.exit_code == 1 and bad.stderr == "Error: no image with id 999999 in this index\n"


def test_search_a_folder_of_queries(index, library, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    for path in list(library.rglob("*.jpg"))[:3]:
        shutil.copy(path, queries / path.name)
    result = run("search", queries, "--index", index.sqlite_path, "-k", "2", "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(lines) == 6
    assert {line["query"] for line in lines} == {str(p) for p in queries.iterdir()}
    assert all(line["score"] == pytest.approx(1.0, abs=1e-4) for line in lines if line["rank"] == 1)


def test_exclude_skips_matching_files_and_folders(tmp_path, library):
    with Index.create(tmp_path / "idx", model=TINY_MODEL) as index:
        index.sync(library, exclude=["*.png", "scans"])
        paths = [r.path for r in index.rows()]
        assert paths and not any(p.endswith(".png") or p.startswith("scans/") for p in paths)
        index.sync(library)  # without the exclusions everything comes in
        assert len(index) == sum(1 for p in library.rglob("*") if p.is_file())
        report = index.sync(library, exclude=["trips/2024/*"])  # now excluded: removed, as a sync should
        assert report.removed == sum(1 for _ in (library / "trips/2024").iterdir())
    result = run("index", library, "--index", tmp_path / "cli", "--model", TINY_MODEL, "--exclude", "*.png", "--json")
    assert json.loads(result.stdout)["added"] == sum(1 for p in library.rglob("*.jpg"))


def test_old_index_is_migrated_with_its_metadata(tmp_path, photos):
    """An index made before metadata columns existed gains folder, name and date when opened for writing."""
    import sqlite3

    build_index(tmp_path / "idx", photos, crop_views=())  # format 1 had none
    conn = sqlite3.connect(tmp_path / "idx.sqlite")
    conn.executescript("""
        DROP TABLE labels; DROP INDEX images_folder; DROP INDEX images_format; DROP INDEX images_date;
        ALTER TABLE images DROP COLUMN folder; ALTER TABLE images DROP COLUMN name;
        ALTER TABLE images DROP COLUMN taken; ALTER TABLE images DROP COLUMN camera;
        ALTER TABLE images DROP COLUMN date;
        DELETE FROM _sqlite_migrations WHERE name = '002_metadata_and_labels';
        UPDATE manifest SET value = '1' WHERE key = 'format_version';
    """)
    conn.commit()
    conn.close()
    with pytest.raises(ImgsimError, match="older format"):
        Index.open(tmp_path / "idx", read_only=True)
    with Index.open(tmp_path / "idx") as index:
        records = list(index.images())
        assert index.info()["format_version"] == 2
    assert all(r["name"] == r["path"] and r["folder"] == "" and r["date"] for r in records)
    assert len(records) == len(os.listdir(photos)) and np.all([r["labels"] == [] for r in records])


def test_labelling_the_root_folder_labels_everything(writable, library, monkeypatch):
    monkeypatch.chdir(library.parent)
    result = run("label", "library", "--add", "all", "--index", writable)
    assert result.exit_code == 0 and result.stdout == f"labelled {sum(1 for p in library.rglob('*') if p.is_file())} images\n"
    assert run("label", ".", "--add", "x", "--index", writable).exit_code == 1  # "." as a stored path is nothing


def test_a_folder_filter_may_be_a_folder_on_disk(built, library, monkeypatch, tmp_path):
    """`--folder` and `--reference` as the user has the folder at hand: absolute, relative to the
    working folder, or through a link to it: the same images as the stored form (before, an
    absolute or working-folder path silently matched nothing)."""
    stored = run("list", "--index", built, "--folder", "trips/2023", "--json")
    assert stored.exit_code == 0 and stored.stdout.count('"id"') >= 2
    (tmp_path / "linked").symlink_to(library / "trips")
    monkeypatch.chdir(library.parent)
    for given in (library / "trips" / "2023", "library/trips/2023", "./library/trips/2023/",
                  tmp_path / "linked" / "2023"):
        listed = run("list", "--index", built, "--folder", given, "--json")
        assert listed.exit_code == 0 and listed.stdout == stored.stdout, given
        found = run("search", library / "scans" / os.listdir(library / "scans")[0], "--index", built,
                    "--folder", given, "--json")
        assert found.exit_code == 0 and found.stdout.count('"id"') == stored.stdout.count('"id"'), given
    everything = run("list", "--index", built, "--folder", library, "--json")  # the root: all of it
    assert everything.stdout == run("list", "--index", built, "--json").stdout
    above = run("list", "--index", built, "--folder", library.parent, "--json")  # a folder holding the root too
    assert above.stdout == everything.stdout
    monkeypatch.chdir(library / "trips" / "2023")
    here = run("list", "--index", built, "--folder", ".", "--json")  # `.`: this folder, not everything
    assert here.exit_code == 0 and here.stdout == stored.stdout
    long_name = run("list", "--index", built, "--folder", "a" * 300)  # no such folder: nothing, no traceback
    assert long_name.exit_code == 0 and long_name.stdout == "" and "matches the filter" in long_name.stderr
    dupes = run("dupes", "--index", built, "--reference", library / "scans", "--json")
    assert dupes.exit_code == 0, dupes.output


def test_similar_and_label_take_a_path_through_a_linked_folder(library, tmp_path):
    """A folder indexed through a link stores paths through the link: `similar` and `label` find
    a file given that way (before: "is not in this index", the link having been resolved away)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "scans").symlink_to(library / "scans")
    build_index(tmp_path / "idx", root)
    name = sorted(os.listdir(library / "scans"))[0]
    found = run("similar", root / "scans" / name, "--index", tmp_path / "idx", "-k", "1")
    assert found.exit_code == 0 and found.stdout.strip(), found.output
    labelled = run("label", root / "scans", "--add", "scan", "--index", tmp_path / "idx")
    assert labelled.exit_code == 0, labelled.output
    assert run("list", "--index", tmp_path / "idx", "--label", "scan").stdout.count("scans/") == \
        len(os.listdir(library / "scans"))


def test_files_indexed_from_outside_the_root_are_found_by_their_folder(tmp_path, photos, monkeypatch):
    """`imgsim index OTHER --index idx` on an index whose root is elsewhere stores OTHER's files with
    absolute paths: `--folder OTHER` (absolute or from the working folder), `--reference` and
    `label OTHER` select them (the filter dropped the leading '/', and matched nothing)."""
    root, other = tmp_path / "root", tmp_path / "other"
    for folder, names in ((root, ("coffee.jpg",)), (other, ("rocket.jpg", "chelsea.jpg"))):
        folder.mkdir()
        for name in names:
            shutil.copy(photos / name, folder / name)
    build_index(tmp_path / "idx", root)
    assert run("index", other, "--index", tmp_path / "idx", "--keep-missing").exit_code == 0
    monkeypatch.chdir(tmp_path)
    for given in (other, "other", "./other/"):
        listed = [json.loads(line)["path"] for line in
                  run("list", "--index", "idx", "--folder", given, "--json").stdout.splitlines()]
        assert listed == [f"{other}/chelsea.jpg", f"{other}/rocket.jpg"], given
    assert run("label", other, "--add", "elsewhere", "--index", "idx").stdout == "labelled 2 images\n"
    dupes = run("dupes", "--index", "idx", "--reference", other)
    assert dupes.exit_code == 0, dupes.output
