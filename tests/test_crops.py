"""Crop views (`imgsim index --centre-view`): each picture's centre kept as vectors of its own, which
a search's best candidates are scored by too (imgsim/crops.py). Real photos, the bundled model."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgsim import ImgsimError, Index
from imgsim.crops import CROP_PENALTY, CROP_VIEWS
from imgsim.models import BUNDLED_MODEL

from .conftest import TINY_MODEL, read_only_folder, run


def _small(folder, out, width=300):
    """The photos as small web pictures (where tight crops defeat the whole picture's vector)."""
    out.mkdir()
    for path in sorted(folder.iterdir()):
        img = Image.open(path).convert("RGB")
        img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS).save(
            out / path.name, quality=90)
    return out


def _grey_centre(path, share):
    img = Image.open(path).convert("RGB")
    cw, ch = round(img.width * share), round(img.height * share)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return ImageOps.grayscale(img.crop((left, top, left + cw, top + ch))).convert("RGB")


@pytest.fixture
def small(photos, tmp_path):
    return _small(photos, tmp_path / "small")


@pytest.fixture
def pair(small, tmp_path):
    """The same small photos indexed twice with the bundled model: plainly, and with crop views."""
    indexes = {}
    for name, views in (("plain", ()), ("crops", CROP_VIEWS)):
        index = Index.create(tmp_path / name, model=BUNDLED_MODEL, root=small, crop_views=views)
        assert index.add(small).added == len(list(small.iterdir()))
        indexes[name] = index
    yield indexes
    for index in indexes.values():
        index.close()


def test_tight_grey_crops_find_their_original_by_its_crop_views(pair, small, tmp_path):
    """A grey centre half of each photo: with crop views its original comes first every time, scoring
    higher than the whole picture's vector alone makes it; the photo itself still scores 1.0."""
    gains = []
    for path in sorted(small.iterdir()):
        query = _grey_centre(path, 0.5)
        found = {name: index.search(query, k=3) for name, index in pair.items()}
        assert found["crops"][0].path == path.name, (path.name, [r.path for r in found["crops"]])
        own = {name: next((r.score for r in results if r.path == path.name), -1.0) for name, results in found.items()}
        gains.append(own["crops"] - own["plain"])
        exact = pair["crops"].search(path, k=1)[0]
        assert exact.path == path.name and exact.score == pytest.approx(1.0, abs=1e-3)
    assert min(gains) >= 0 and np.median(gains) > 0.05, gains


def test_crop_views_are_stored_beside_each_image_and_go_with_it(pair, small):
    index = pair["crops"]
    info = index.info()
    assert info["preprocess"]["crop_views"] == list(CROP_VIEWS)
    assert "crop_views" not in pair["plain"].info()["preprocess"]
    rows = index.store.conn.execute("SELECT count(*), min(length(vectors)), max(length(vectors)) "
                                    "FROM crop_vectors").fetchone()
    assert rows == (len(index), 2 * index.manifest.dim * len(CROP_VIEWS), 2 * index.manifest.dim * len(CROP_VIEWS))
    assert pair["plain"].store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == 0
    gone = sorted(small.iterdir())[0]
    gone.unlink()
    Image.new("RGB", (300, 200), (40, 90, 160)).save(small / "new.jpg")
    report = index.sync(small)
    assert (report.removed, report.added) == (1, 1)
    count, distinct = index.store.conn.execute(
        "SELECT count(*), count(DISTINCT c.id) FROM crop_vectors c JOIN images i ON i.id = c.id").fetchone()
    assert count == distinct == len(index) == index.store.conn.execute(
        "SELECT count(*) FROM crop_vectors").fetchone()[0]


def test_a_crop_view_gives_up_its_penalty_to_the_picture_itself(pair, small):
    """Searched with a crop view's own vector, its picture scores by that view less the penalty."""
    index = pair["crops"]
    image_id, blob = index.store.conn.execute("SELECT id, vectors FROM crop_vectors ORDER BY id LIMIT 1").fetchone()
    views = np.frombuffer(blob, "<f2").reshape(len(CROP_VIEWS), -1).astype(np.float32)
    top = index.search(views[1], k=1, expand=False)[0]
    assert top.id == image_id and top.score == pytest.approx(1.0 - CROP_PENALTY, abs=2e-3)
    exact = index.search(views[1], k=1, exact=True)[0]
    assert (exact.id, exact.score) == (top.id, top.score)


def test_damaged_crop_views_are_passed_over_and_a_missing_table_is_reported(pair, small, tmp_path):
    index = pair["crops"]
    path = sorted(small.iterdir())[1]
    query = _grey_centre(path, 0.5)
    before = index.search(query, k=1)[0]
    with index.store.transaction():
        index.store.conn.execute("UPDATE crop_vectors SET vectors = x'00ff' WHERE id = ?", (before.id,))
    after = index.search(query, k=3)
    assert after and before.id in [r.id for r in after]  # scored by its own vector, nothing raised
    assert next(r.score for r in after if r.id == before.id) < before.score
    index.close()
    conn = sqlite3.connect(tmp_path / "crops.sqlite")
    conn.execute("DROP TABLE crop_vectors")
    conn.commit()
    conn.close()
    with Index.open(tmp_path / "crops", read_only=True) as damaged:
        with pytest.raises(ImgsimError, match="damaged: its crop views cannot be read"):
            damaged.search(query, k=3)


def test_a_read_only_index_with_crop_views_searches(pair, small, tmp_path):
    pair["crops"].close()
    path = sorted(small.iterdir())[2]
    with read_only_folder(tmp_path):
        with Index.open(tmp_path / "crops", read_only=True) as index:
            assert index.search(_grey_centre(path, 0.5), k=1)[0].path == path.name


def test_centre_view_makes_crop_views_and_keeps_older_averaged_indexes(tmp_path, photos):
    made = run("index", photos, "--index", tmp_path / "c", "--model", TINY_MODEL, "--centre-view", "--json")
    assert made.exit_code == 0, made.output
    with Index.open(tmp_path / "c", read_only=True) as index:
        assert index.manifest.preprocess.crop_views == CROP_VIEWS and index.manifest.preprocess.index_views == ()
        top = index.search(photos / "coffee.jpg", k=1)[0]
        assert top.path == "coffee.jpg" and top.score == pytest.approx(1.0, abs=1e-3)  # its own vector, as it is
    assert run("index", photos, "--index", tmp_path / "c").exit_code == 0  # kept without saying it again
    plain = run("index", photos, "--index", tmp_path / "p", "--model", TINY_MODEL)
    assert plain.exit_code == 0
    refused = run("index", photos, "--index", tmp_path / "p", "--centre-view")
    assert refused.exit_code == 1 and "was made with no extra view" in refused.stderr
    # An index made by --centre-view before crop views (the centre averaged into each vector) goes on so.
    with Index.create(tmp_path / "old", model=TINY_MODEL, root=photos, index_views=("centre60",)) as old:
        old.add(sorted(photos.iterdir())[:3])
    again = run("index", photos, "--index", tmp_path / "old", "--centre-view")
    assert again.exit_code == 0, again.output
    with Index.open(tmp_path / "old", read_only=True) as old:
        assert old.manifest.preprocess.index_views == ("centre60",) and old.manifest.preprocess.crop_views == ()
        assert old.store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == 0
        top = old.search(photos / "coffee.jpg", k=1)[0]
        assert top.path == "coffee.jpg" and top.score < 0.9999  # the stored vector also holds the centre


def test_verify_finds_damaged_crop_views_and_repair_has_them_embedded_again(pair, small):
    index = pair["crops"]
    assert index.verify().ok
    first, second = index.store.conn.execute("SELECT id FROM images ORDER BY id LIMIT 2").fetchall()
    with index.store.transaction():
        index.store.conn.execute("UPDATE crop_vectors SET vectors = x'0102' WHERE id = ?", first)
        index.store.conn.execute("DELETE FROM crop_vectors WHERE id = ?", second)
    found = index.verify()
    assert not found.ok and any("2 images' crop views are missing or damaged" in p for p in found.problems)
    repaired = index.verify(repair=True)
    assert repaired.ok and any("removed 2 images whose crop views" in r for r in repaired.repaired), repaired
    assert index.sync(small).added == 2
    assert index.verify().ok and index.store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == len(index)
