"""`imgsim dupes` with the bundled model on real photos: transformed copies join their original,
different photos stay apart, the keeper is the best file, and --move-to only ever moves non-keepers."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgsim import Index
from imgsim.models import BUNDLED_MODEL

from .conftest import build_index, run, transformed_copies

ORIGINALS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle_left"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, photo_images) -> Path:
    """originals/ holds photos; copies/ their resized, re-encoded, cropped, brightened, EXIF-rotated,
    mirrored and byte-identical copies; others/ more photos with no copies; archive/ one small copy."""
    root = tmp_path_factory.mktemp("dupes") / "pictures"
    for sub in ("originals", "copies", "others", "archive"):
        (root / sub).mkdir(parents=True)
    for name, img in photo_images.items():
        if name not in ORIGINALS:
            img.save(root / "others" / f"{name}.jpg", quality=92)
            continue
        img.save(root / "originals" / f"{name}.jpg", quality=95)
        for kind, data in transformed_copies(img).items():
            (root / "copies" / f"{name}-{kind}.jpg").write_bytes(data)
        ImageOps.mirror(img).save(root / "copies" / f"{name}-mirror.jpg", quality=90)
        shutil.copy(root / "originals" / f"{name}.jpg", root / "copies" / f"{name}-same-bytes.jpg")
    small = photo_images["chelsea"].resize((200, 150), Image.Resampling.LANCZOS)
    small.save(root / "archive" / "chelsea-small.jpg", quality=85)  # an old, smaller copy in a reference folder
    return root


@pytest.fixture(scope="module")
def indexed(collection) -> Path:
    path = collection.parent / "idx"
    with Index.create(path, model=BUNDLED_MODEL) as index:
        index.add(collection)
    return path


def original_of(path: str) -> str:
    return Path(path).name.split("-")[0].removesuffix(".jpg")


def test_copies_join_their_original_and_different_photos_stay_apart(indexed):
    with Index.open(indexed, read_only=True) as index:
        groups = index.duplicates()
    by_original = {}
    for group in groups:
        owners = {original_of(p) for p in group.paths}
        assert len(owners) == 1, f"different photos grouped: {group.paths}"  # precision
        assert not any(p.startswith("others/") for p in group.paths)
        by_original[owners.pop()] = group
    assert set(by_original) == set(ORIGINALS)  # every original has its group
    for name, group in by_original.items():
        assert group.keeper["path"] == f"originals/{name}.jpg"  # most pixels (ties: largest file, oldest)
        kinds = {Path(p).stem.removeprefix(f"{name}-") for p in group.paths[1:]}
        assert kinds >= {"resized", "jpeg40", "crop80", "brighter", "exif-rotated", "mirror", "same-bytes"}, kinds
        identical = dict(zip(group.paths, group.identical))
        assert identical[f"copies/{name}-same-bytes.jpg"] and not identical[f"copies/{name}-resized.jpg"]
        assert group.scores[0] == 1.0 and all(0.5 < s <= 1.0 for s in group.scores)
        rest = list(zip(group.identical[1:], group.scores[1:]))  # closest to the keeper first
        assert rest == sorted(rest, key=lambda item: (not item[0], -item[1]))


def test_output_formats(indexed, tmp_path):
    plain = run("dupes", "--index", indexed)
    assert plain.exit_code == 0
    assert len(plain.stdout.splitlines()) == len(ORIGINALS)  # one group per line
    first = plain.stdout.splitlines()[0]
    assert "keep " in first and "(identical)" in first
    objects = [json.loads(line) for line in run("dupes", "--index", indexed, "--json").stdout.splitlines()]
    assert len(objects) == len(ORIGINALS)
    assert all({"paths", "keeper", "scores"} <= set(o) and o["paths"][0] == o["keeper"] for o in objects)
    rows = list(csv.DictReader(io.StringIO(run("dupes", "--index", indexed, "--csv").stdout)))
    assert sum(r["keeper"] == "True" for r in rows) == len(ORIGINALS)
    assert len(rows) == sum(len(o["paths"]) for o in objects)
    strict = [json.loads(line) for line in
              run("dupes", "--index", indexed, "--json", "--threshold", "0.999").stdout.splitlines()]
    assert sum(len(g["paths"]) for g in strict) < sum(len(o["paths"]) for o in objects)  # fewer join
    for name in ORIGINALS:  # byte-identical files are grouped whatever the threshold
        assert any({f"originals/{name}.jpg", f"copies/{name}-same-bytes.jpg"} <= set(g["paths"]) for g in strict)


def test_min_size_and_filters_limit_who_takes_part(indexed):
    small = [json.loads(line) for line in run("dupes", "--index", indexed, "--json", "--min-size", "1MB").stdout.splitlines()]
    assert small == []
    only_copies = [json.loads(line) for line in
                   run("dupes", "--index", indexed, "--json", "--folder", "copies").stdout.splitlines()]
    assert only_copies and all(p.startswith("copies/") for g in only_copies for p in g["paths"])
    assert run("dupes", "--index", indexed, "--min-size", "lots").exit_code == 2


def test_reference_folders_keep_and_against_reference_answers_what_do_i_have(indexed):
    with Index.open(indexed, read_only=True) as index:
        groups = index.duplicates(reference=["copies"])
        for group in groups:  # a reference file is always the keeper, even when it has fewer pixels
            assert group.keeper["path"].startswith("copies/")
        have = index.duplicates(reference=["originals"], against_reference=True)
        # Every copy a reference file too: the byte-identical reference pairs (an original and its
        # same-bytes copy) are no answer to "which of the others do I have?"; each group has another.
        both = index.duplicates(reference=["originals", "copies"], against_reference=True)
        assert all(any(not p.startswith(("originals/", "copies/")) for p in g.paths) for g in both)
    assert {original_of(g.keeper["path"]) for g in have} == set(ORIGINALS)
    assert all(sum(p.startswith("originals/") for p in g.paths) == 1 for g in have)
    missing = run("dupes", "--index", indexed, "--reference", "nowhere")
    assert missing.exit_code == 1 and "no indexed images under the reference" in missing.stderr
    assert run("dupes", "--index", indexed, "--against-reference").exit_code == 2  # a usage error


def test_move_to_moves_only_non_keepers_and_can_be_undone(collection, indexed, tmp_path):
    work = tmp_path / "pictures"
    shutil.copytree(collection, work)
    for suffix in (".sqlite", ".faiss"):
        shutil.copy(indexed.with_suffix(suffix), tmp_path / f"idx{suffix}")
    index_path = tmp_path / "idx"
    before = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.jpg"))
    dry = run("dupes", "--index", index_path, "--move-to", tmp_path / "dupes")
    assert dry.exit_code == 0 and not (tmp_path / "dupes").exists()  # without --yes nothing moves
    planned = [line for line in dry.stdout.splitlines() if line.startswith("would move ")]
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*.jpg")) == before

    (tmp_path / "dupes" / "copies").mkdir(parents=True)
    (tmp_path / "dupes" / "copies" / "coffee-mirror.jpg").write_bytes(b"already here")  # never overwritten
    done = run("dupes", "--index", index_path, "--move-to", tmp_path / "dupes", "--yes", "--reference", "archive")
    assert done.exit_code == 1, done.output  # one file was not moved: not a success for a script
    moved = [line for line in done.stdout.splitlines() if line.startswith("moved ")]
    assert "not moved" in done.stderr and "coffee-mirror.jpg" in done.stderr
    assert (tmp_path / "dupes" / "copies" / "coffee-mirror.jpg").read_bytes() == b"already here"
    assert len(moved) == len(planned) - 1  # the refused one (chelsea: its original moves, the archive copy stays)
    again = [run("dupes", "--index", index_path, "--move-to", tmp_path / "dupes", "--yes", "--reference", "archive",
                 *quiet) for quiet in ([], ["-q"])]  # the one left still cannot move: said even with -q
    assert all(r.exit_code == 1 and "not moved" in r.stderr and "coffee-mirror.jpg" in r.stderr for r in again)
    assert "moved 0 of 1 files" in again[0].stderr and "move them back" not in again[0].stderr  # nothing to undo
    remaining = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.jpg"))
    assert all(f"originals/{name}.jpg" in remaining for name in ORIGINALS if name != "chelsea")  # keepers stay
    assert "archive/chelsea-small.jpg" in remaining and "originals/chelsea.jpg" not in remaining  # reference keeps
    assert all(p in remaining for p in before if p.startswith("others/"))
    with Index.open(index_path, read_only=True) as index:  # the index agrees with the folder
        assert sorted(r.path for r in index.rows()) == remaining
        assert index.verify().ok
        assert [g.paths for g in index.duplicates()] == [["originals/coffee.jpg", "copies/coffee-mirror.jpg"]]
    for path in (tmp_path / "dupes").rglob("*.jpg"):  # undo: move everything back
        if path.read_bytes() != b"already here":
            path.rename(work / path.relative_to(tmp_path / "dupes"))
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*.jpg")) == before


def test_move_to_inside_the_indexed_folder_is_refused(indexed, collection):
    result = run("dupes", "--index", indexed, "--move-to", collection / "dupes", "--yes")
    assert result.exit_code == 1 and "inside the indexed folder" in result.stderr
    assert run("dupes", "--index", indexed, "--yes").exit_code == 2


def test_html_pages_render_every_thumbnail_in_chromium(indexed, collection, tmp_path):
    page = tmp_path / "dupes.html"
    assert run("dupes", "--index", indexed, "--html", page).exit_code == 0
    query = collection / "copies" / "rocket-crop80.jpg"
    results = tmp_path / "search.html"
    assert run("search", query, collection / "others", "--index", indexed, "-k", "4", "--html", results).exit_code == 0
    similar = tmp_path / "similar.html"
    assert run("similar", "originals/coffee.jpg", "--index", indexed, "--html", similar).exit_code == 0
    text = page.read_text()
    assert "<script" not in text and "http" not in text.split("<body>")[1]  # self-contained, nothing to fetch
    assert page.stat().st_size < 1_000_000
    shots = render_in_chromium([page, results, similar], tmp_path)
    counts = {path.name: count for path, count in shots}
    assert counts["dupes.html"] == sum(len(json.loads(line)["paths"]) for line in
                                       run("dupes", "--index", indexed, "--json").stdout.splitlines())
    assert counts["search.html"] == 1 + 4 + len(list((collection / "others").iterdir())) * 5
    assert counts["similar.html"] == 1 + 10


def render_in_chromium(pages: list[Path], out: Path) -> list[tuple[Path, int]]:
    """Open each page in headless Chromium, check every image decoded, save a screenshot; return
    (page, number of images) for each."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    found = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            view = browser.new_page(viewport={"width": 1000, "height": 800})
            for page in pages:
                view.goto(page.as_uri())
                view.wait_for_load_state("load")
                images = view.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
                assert images and all(done and w > 0 and h > 0 for done, w, h in images), (page.name, images)
                view.screenshot(path=str(out / f"{page.stem}.png"), full_page=True)
                assert Image.open(out / f"{page.stem}.png").size[0] >= 1000
                found.append((page, len(images)))
        finally:
            browser.close()
    return found


def test_a_keeper_whose_stored_vector_is_damaged_is_scored_through_its_identical_copy(tmp_path, photos):
    """The keeper of a group (the oldest of two byte-identical files) has a damaged vector: the
    group is still found through the copy, and every score is a number (it was NaN, and --json
    printed invalid JSON)."""
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(photos / "coffee.jpg", folder / "a_keeper.jpg")
    shutil.copy(photos / "coffee.jpg", folder / "b_copy.jpg")
    os.utime(folder / "b_copy.jpg", ns=(2_000_000_000 * 10**9,) * 2)  # newer: a_keeper is kept
    with Image.open(photos / "coffee.jpg") as img:
        img.resize((img.width // 2, img.height // 2)).save(folder / "c_small.jpg", quality=90)
    build_index(tmp_path / "idx", folder)
    with Index.open(tmp_path / "idx", read_only=True) as index:
        keeper_id = next(r.id for r in index.rows() if r.path == "a_keeper.jpg")
    conn = sqlite3.connect(tmp_path / "idx.sqlite")
    with conn:
        conn.execute("UPDATE vectors SET vector = ? WHERE id = ?", (np.full(48, np.inf, "<f2").tobytes(), keeper_id))
    conn.close()
    out = run("dupes", "--index", tmp_path / "idx", "--json")
    assert out.exit_code == 0, out.output
    (group,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert group["paths"][0] == "a_keeper.jpg" and set(group["paths"]) == {"a_keeper.jpg", "b_copy.jpg", "c_small.jpg"}
    assert all(isinstance(score, float) and 0.5 < score <= 1.0 for score in group["scores"]), group["scores"]


def test_the_default_threshold_is_the_index_models(indexed, collection, tmp_path):
    """Learned whitening spreads scores differently: an index made with efficientnet-lite0-lw groups at
    0.74 by default, one made with plain Lite0 at 0.80 (README, "Duplicates"); the CLI says which."""
    with Index.open(indexed, read_only=True) as index:
        assert index.manifest.model == "efficientnet-lite0-lw" and index.dupes_threshold == 0.74
        found = [g.paths for g in index.duplicates()]
        assert found == [g.paths for g in index.duplicates(threshold=0.74)]
        assert found != [g.paths for g in index.duplicates(threshold=0.80)]  # the copies scoring 0.74-0.80 join
    plain = tmp_path / "plain"
    with Index.create(plain, model="efficientnet-lite0") as index:
        index.add(collection / "originals")
        assert index.dupes_threshold == 0.80
    help_text = "".join(run("dupes", "--help").output.split())  # click wraps lines, even inside names
    assert "0.74forefficientnet-lite0-lwandefficientnet-lite0-lw-int8,0.8forothermodels" in help_text
    result = run("dupes", "--index", indexed)
    assert result.exit_code == 0 and "(threshold 0.74)" in result.stderr
    assert '"dupes_threshold": 0.74' in run("info", "--index", indexed, "--json").output
