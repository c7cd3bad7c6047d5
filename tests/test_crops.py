"""Crop views (by default the centre 60 % in grey, seen sharp and blurred; `imgsim index --centre-view`:
70 % and 50 % in grey): each
picture's centre kept as vectors of its own, which a search's best candidates are scored by too
(imgsim/crops.py), stored as 2-bit codes (imgsim/crop_codes.py; float16 in indexes made before).
Real photos, the bundled model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgsim import ImgsimError, Index, IndexCorruptError, crop_codes, crops
from imgsim.crops import CROP_PENALTY, CROP_VIEWS, DEFAULT_CROP_VIEWS
from imgsim.models import BUNDLED_MODEL
from imgsim.store import CROP_SLOTS

from .conftest import TINY_MODEL, read_only_folder, run


def _small(folder, out, width=300):
    """The photos as small web pictures (where tight crops defeat the whole picture's vector)."""
    out.mkdir()
    for path in sorted(folder.iterdir()):
        img = Image.open(path).convert("RGB")
        img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS).save(
            out / path.name, quality=90)
    return out


def _grey_centre(path, share, grey=True):
    img = Image.open(path).convert("RGB")
    cw, ch = round(img.width * share), round(img.height * share)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    crop = img.crop((left, top, left + cw, top + ch))
    return ImageOps.grayscale(crop).convert("RGB") if grey else crop


@pytest.fixture
def small(photos, tmp_path):
    return _small(photos, tmp_path / "small")


@pytest.fixture
def float16_crop_views(monkeypatch):
    """New indexes with crop views store them as float16, as imgsim did before format 6."""
    monkeypatch.setattr(crop_codes, "TWO_BIT", crop_codes.FLOAT16)


@pytest.fixture
def pair(small, tmp_path):
    """The same small photos indexed with the bundled model: plainly, with the crop views of
    `--centre-view`, and as by default (its one crop view)."""
    indexes = {}
    for name, views in (("plain", ()), ("crops", CROP_VIEWS), ("default", None)):
        kwargs = {} if views is None else {"crop_views": views}
        index = Index.create(tmp_path / name, model=BUNDLED_MODEL, root=small, **kwargs)
        assert index.add(small).added == len(list(small.iterdir()))
        indexes[name] = index
    yield indexes
    for index in indexes.values():
        index.close()


@pytest.mark.parametrize("kind", ["crops", "default"])
def test_tight_grey_crops_find_their_original_by_its_crop_views(pair, small, tmp_path, kind):
    """A grey centre half of each photo: with crop views (by default, or --centre-view's) its
    original comes first every time, scoring higher than the whole picture's vector alone makes it;
    the photo itself still scores 1.0."""
    gains = []
    for path in sorted(small.iterdir()):
        query = _grey_centre(path, 0.5)
        found = {name: index.search(query, k=3) for name, index in pair.items()}
        assert found[kind][0].path == path.name, (path.name, [r.path for r in found[kind]])
        own = {name: next((r.score for r in results if r.path == path.name), -1.0) for name, results in found.items()}
        gains.append(own[kind] - own["plain"])
        exact = pair[kind].search(path, k=1)[0]
        assert exact.path == path.name and exact.score == pytest.approx(1.0, abs=1e-3)
        # the crop views are grey; a crop in colour is found as well
        assert pair[kind].search(_grey_centre(path, 0.5, grey=False), k=1)[0].path == path.name
    assert min(gains) >= 0 and np.median(gains) > 0.05, gains


@pytest.mark.parametrize("kind", ["crops", "default"])
def test_crop_views_are_stored_beside_each_image_and_go_with_it(pair, small, kind):
    index = pair[kind]
    views = CROP_VIEWS if kind == "crops" else DEFAULT_CROP_VIEWS
    info = index.info()
    assert info["preprocess"]["crop_views"] == list(views) and info["preprocess"]["crop_code"] == "2bit"
    assert "crop_views" not in pair["plain"].info()["preprocess"]
    assert "crop_code" not in pair["plain"].info()["preprocess"]
    assert info["format_version"] == (7 if kind == "default" else 6)  # older imgsims refuse it (soft views: 7)
    assert pair["plain"].info()["format_version"] == 3
    rows = index.store.conn.execute("SELECT count(*), min(length(vector)), max(length(vector)) "
                                    "FROM crop_vectors").fetchone()
    assert rows == (len(index) * len(views), 2 + index.manifest.dim // 4, 2 + index.manifest.dim // 4)  # 322 bytes
    assert pair["plain"].store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == 0
    gone = sorted(small.iterdir())[0]
    gone.unlink()
    Image.new("RGB", (300, 200), (40, 90, 160)).save(small / "new.jpg")
    report = index.sync(small)
    assert (report.removed, report.added) == (1, 1)
    shutil.copy(small / "new.jpg", small / "copy of new.jpg")  # a copy of a known file: no embedding
    report = index.sync(small)
    assert (report.added, report.embedded) == (1, 0)
    count, images = index.store.conn.execute(
        f"SELECT count(*), count(DISTINCT i.id) FROM crop_vectors c JOIN images i ON i.id = c.id / {CROP_SLOTS}"
    ).fetchone()
    assert images == len(index) and count == len(index) * len(views) == index.store.conn.execute(
        "SELECT count(*) FROM crop_vectors").fetchone()[0]
    assert index.verify().ok
    copy = index.search(small / "copy of new.jpg", k=2)
    assert {r.path for r in copy} == {"new.jpg", "copy of new.jpg"}


def test_a_crop_view_gives_up_its_penalty_to_the_picture_itself(pair, small):
    """Searched with a crop view's own vector, its picture scores by that view less the penalty."""
    index = pair["crops"]
    key, blob = index.store.conn.execute("SELECT id, vector FROM crop_vectors ORDER BY id LIMIT 1 OFFSET 1").fetchone()
    image_id, view = divmod(key, CROP_SLOTS)
    assert view == 1
    view_vector = crop_codes.decode(crop_codes.TWO_BIT, blob, 1, index.manifest.dim)[0]
    top = index.search(view_vector, k=1, expand=False)[0]
    assert top.id == image_id and top.score == pytest.approx(1.0 - CROP_PENALTY, abs=2e-3)
    exact = index.search(view_vector, k=1, exact=True)[0]
    assert (exact.id, exact.score) == (top.id, top.score)


def test_damaged_crop_views_are_passed_over_and_a_missing_table_is_reported(pair, small, tmp_path):
    index = pair["crops"]
    path = sorted(small.iterdir())[1]
    query = _grey_centre(path, 0.5)
    before = index.search(query, k=1)[0]
    with index.store.transaction():
        index.store.conn.execute("UPDATE crop_vectors SET vector = x'00ff' WHERE id = ?", (before.id * CROP_SLOTS,))
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
    plain = run("index", photos, "--index", tmp_path / "p", "--model", TINY_MODEL, "--no-centre-view")
    assert plain.exit_code == 0
    with Index.open(tmp_path / "p", read_only=True) as index:
        assert index.manifest.preprocess.crop_views == () and index.info()["format_version"] == 3
        assert index.store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == 0
    refused = run("index", photos, "--index", tmp_path / "p", "--centre-view")
    assert refused.exit_code == 1 and "was made with no extra view: views are chosen when an index is made" \
        in refused.stderr
    default = run("index", photos, "--index", tmp_path / "d", "--model", TINY_MODEL)
    assert default.exit_code == 0
    with Index.open(tmp_path / "d", read_only=True) as index:
        assert index.manifest.preprocess.crop_views == DEFAULT_CROP_VIEWS and index.info()["format_version"] == 7
        assert index.store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == len(index)
    for flag in ("--centre-view", "--no-centre-view"):
        refused = run("index", photos, "--index", tmp_path / "d", flag)
        assert refused.exit_code == 1 and "was made with crop views soft60: views are chosen" in refused.stderr
    assert run("index", photos, "--index", tmp_path / "d").exit_code == 0
    # An index made by --centre-view before crop views (the centre averaged into each vector) goes on so.
    with Index.create(tmp_path / "old", model=TINY_MODEL, root=photos, index_views=("centre60",), crop_views=()) as old:
        old.add(sorted(photos.iterdir())[:3])
    again = run("index", photos, "--index", tmp_path / "old", "--centre-view")
    assert again.exit_code == 0, again.output
    with Index.open(tmp_path / "old", read_only=True) as old:
        assert old.manifest.preprocess.index_views == ("centre60",) and old.manifest.preprocess.crop_views == ()
        assert old.store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == 0
        top = old.search(photos / "coffee.jpg", k=1)[0]
        assert top.path == "coffee.jpg" and top.score < 0.9999  # the stored vector also holds the centre


def test_indexes_with_float16_crop_views_go_on_as_made(tmp_path, photos, float16_crop_views):
    """Indexes made before format 6 (crop views stored as float16) are searched, indexed and verified
    as they were made: one made with the first crop views (in colour, format 4) by --centre-view too."""
    with Index.create(tmp_path / "colour", model=TINY_MODEL, root=photos, crop_views=("centre70", "centre50")) as old:
        assert old.info()["format_version"] == 4
        old.add(sorted(photos.iterdir())[:3])
    again = run("index", photos, "--index", tmp_path / "colour", "--centre-view")
    assert again.exit_code == 0, again.output
    with Index.open(tmp_path / "colour", read_only=True) as old:
        assert old.manifest.preprocess.crop_views == ("centre70", "centre50") and old.info()["format_version"] == 4
        assert old.verify().ok and len(old) == len(list(photos.iterdir()))
        assert old.store.conn.execute("SELECT min(length(vector)) FROM crop_vectors").fetchone()[0] == 2 * old.manifest.dim
    with pytest.raises(ImgsimError, match="was made with crop views centre70, centre50"):
        Index.open_or_create(tmp_path / "colour", crop_views=("grey60",))  # other views named: refused
    with Index.create(tmp_path / "grey", model=TINY_MODEL, root=photos, crop_views=CROP_VIEWS) as old:
        assert old.info()["format_version"] == 5 and "crop_code" not in old.info()["preprocess"]
        old.add(sorted(photos.iterdir())[:3])
        dim = old.manifest.dim
    with Index.open_or_create(tmp_path / "grey") as old:  # what a fifth-round index meets now
        assert old.add(sorted(photos.iterdir())[3:]).added == len(list(photos.iterdir())) - 3
        sizes = old.store.conn.execute("SELECT min(length(vector)), max(length(vector)) FROM crop_vectors").fetchone()
        assert sizes == (2 * dim, 2 * dim) and old.verify().ok
        top = old.search(_grey_centre(photos / "coffee.jpg", 0.5), k=1)[0]
        assert top.path == "coffee.jpg"
        first = old.store.conn.execute("SELECT id FROM images ORDER BY id LIMIT 1").fetchone()[0]
        with old.store.transaction():  # a float16 view that is not unit length is damaged
            old.store.conn.execute("UPDATE crop_vectors SET vector = ? WHERE id = ?",
                                   (np.full(dim, 0.5, "<f2").tobytes(), first * CROP_SLOTS))
        assert any("1 images' crop views are missing or damaged" in p for p in old.verify().problems)


def test_verify_finds_damaged_crop_views_and_repair_has_them_embedded_again(pair, small):
    index = pair["crops"]
    assert index.verify().ok
    first, second = index.store.conn.execute("SELECT id FROM images ORDER BY id LIMIT 2").fetchall()
    third = index.store.conn.execute("SELECT id FROM images ORDER BY id LIMIT 1 OFFSET 2").fetchone()
    with index.store.transaction():
        index.store.conn.execute("UPDATE crop_vectors SET vector = x'0102' WHERE id = ?", (first[0] * CROP_SLOTS,))
        index.store.conn.execute("DELETE FROM crop_vectors WHERE id = ?", (second[0] * CROP_SLOTS + 1,))
        # text of a code's length, and a float16 vector where a code belongs
        index.store.conn.execute("UPDATE crop_vectors SET vector = ? WHERE id = ?",
                                 ("x" * (2 + index.manifest.dim // 4), third[0] * CROP_SLOTS))
        index.store.conn.execute("UPDATE crop_vectors SET vector = ? WHERE id = ?",
                                 (np.full(index.manifest.dim, 0.5, "<f2").tobytes(), third[0] * CROP_SLOTS + 1))
    found = index.verify()
    assert not found.ok and any("3 images' crop views are missing or damaged" in p for p in found.problems)
    repaired = index.verify(repair=True)
    assert repaired.ok and any("removed 3 images whose crop views" in r for r in repaired.repaired), repaired
    assert index.sync(small).added == 3
    assert index.verify().ok
    assert index.store.conn.execute("SELECT count(*) FROM crop_vectors").fetchone()[0] == len(CROP_VIEWS) * len(index)


def test_expansion_ranks_the_crop_scores_as_it_ranks_any(pair, small):
    """Expanded searches of a crop-view index rank exactly as query expansion over the crop-lifted
    scores does, computed here from the results by the query alone (every image is a candidate)."""
    index = pair["crops"]
    lifted = 0
    for path in sorted(small.iterdir()):
        query = index.embed(_grey_centre(path, 0.5))
        alone = index.search(query, k=len(index), expand=False)
        own = index.graph.score_against(query, np.stack([index.vector(r.id) for r in alone]))
        lifted += int(list(np.argsort(-own, kind="stable")[:5]) != list(range(5)))  # crop views changed the order
        prepared = index.graph._prepare(np.stack([index.vector(r.id) for r in alone]))
        expanded = np.array([r.score for r in alone]) + 0.5 * prepared @ prepared[:3].sum(axis=0)
        expanded[0] = np.inf
        order = np.argsort(-expanded, kind="stable")[:5]
        found = index.search(query, k=5)
        assert [r.id for r in found] == [alone[i].id for i in order]
        assert [r.score for r in found] == [alone[i].score for i in order]
    assert lifted >= 2


def test_exact_and_filtered_searches_score_crop_views_beyond_k(pair, small):
    index = pair["crops"]
    for path in sorted(small.iterdir()):
        query = _grey_centre(path, 0.4)
        walked = index.search(query, k=1, expand=False)[0]
        exact = index.search(query, k=1, exact=True, expand=False)[0]
        assert (exact.id, exact.score) == pytest.approx((walked.id, walked.score), abs=1e-6)
        ids = index.store.ids()
        filtered = index.graph.search(index.embed(query), 1, allowed=ids[ids != walked.id], exact=True)
        walked_f = index.graph.search(index.embed(query), 1, allowed=ids[ids != walked.id])
        assert filtered[1][0] == walked_f[1][0] and filtered[0][0] == pytest.approx(walked_f[0][0], abs=1e-6)


@pytest.mark.parametrize("kind", ["crops", "default"])
def test_a_parquet_export_carries_crop_views_and_its_import_searches_alike(pair, small, tmp_path, monkeypatch, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from imgsim.export import parquet
    from imgsim.export.parquet import CROP_COLUMN, export_parquet, import_parquet, read_metadata

    index = pair[kind]
    export_parquet(index, tmp_path / "c.parquet")
    # An imgsim that knows no crop views imports it without them; soft ones need one that knows them:
    # one that reads only format 2 (the seventh step's) says the file is newer, in one line.
    assert read_metadata(tmp_path / "c.parquet")["format_version"] == (3 if kind == "default" else 1)
    if kind == "default":
        with monkeypatch.context() as older:
            older.setattr(parquet, "FORMAT_VERSION", 2)
            with pytest.raises(ImgsimError, match="newer imgsim"):
                import_parquet(tmp_path / "c.parquet", tmp_path / "older")
    table = pq.read_table(tmp_path / "c.parquet")
    assert set(map(len, table.column(CROP_COLUMN).to_pylist())) == {len(index.manifest.preprocess.crop_views) * 322}
    import_parquet(tmp_path / "c.parquet", tmp_path / "imported")
    queries = [_grey_centre(path, 0.5) for path in sorted(small.iterdir())]
    with Index.open(tmp_path / "imported") as imported:
        assert imported.manifest.preprocess == index.manifest.preprocess and len(imported) == len(index)
        assert imported.info()["format_version"] == index.info()["format_version"] and imported.verify().ok
        for query in queries:
            assert [(r.id, r.score) for r in imported.search(query, k=3)] == \
                [(r.id, r.score) for r in index.search(query, k=3)]
    # A file without the column (an older imgsim's export) is imported without crop views.
    pq.write_table(table.drop_columns([CROP_COLUMN]).replace_schema_metadata(table.schema.metadata),
                   tmp_path / "old.parquet")
    import_parquet(tmp_path / "old.parquet", tmp_path / "old")
    with Index.open(tmp_path / "old") as old:
        assert old.manifest.preprocess.crop_views == () and old.info()["format_version"] == 3 and old.verify().ok
    # Crop views of the wrong size are refused, and nothing is left behind.
    column = pa.array([b"x" * 7] * len(table), pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index(CROP_COLUMN), CROP_COLUMN, column),
                   tmp_path / "bad.parquet")
    with pytest.raises(ImgsimError, match="crop views of image .* are 7 bytes"):
        import_parquet(tmp_path / "bad.parquet", tmp_path / "bad")
    assert not list(tmp_path.glob("*bad.sqlite*"))


@pytest.mark.parametrize("views", [["centre50"] * 2, ["centre70", "centre60", "centre50", "centre40", "centre30"],
                                   ["centre50"] * 5000, ["mirror"], ["grey5"], ["grey100"], ["greyish"], ["soft"],
                                   ["grey\u0967\u0966"], [70], ["centre 70"]])
def test_a_manifest_asking_for_too_many_or_unknown_crop_views_is_refused(pair, tmp_path, views):
    pair["crops"].close()
    conn = sqlite3.connect(tmp_path / "crops.sqlite")
    (stored,) = conn.execute("SELECT value FROM manifest WHERE key = 'preprocess'").fetchone()
    conn.execute("UPDATE manifest SET value = ? WHERE key = 'preprocess'",
                 (json.dumps({**json.loads(stored), "crop_views": views}),))
    conn.commit()
    conn.close()
    with pytest.raises(IndexCorruptError, match="invalid manifest"):
        Index.open(tmp_path / "crops", read_only=True)


@pytest.mark.parametrize("kind, version", [("crops", 3), ("crops", 4), ("crops", 5), ("default", 6)])
def test_grey_crop_views_in_an_older_format_manifest_are_refused(pair, tmp_path, kind, version):
    """Crop views need format 4 (an older imgsim, which reads format 3, would add images without them),
    grey ones format 5 (a format-4 imgsim does not know them), 2-bit codes format 6 (a format-5
    imgsim would take them for damaged float16 vectors), soft ones format 7 (a format-6 imgsim does
    not know them)."""
    pair[kind].close()
    conn = sqlite3.connect(tmp_path / f"{kind}.sqlite")
    conn.execute("UPDATE manifest SET value = ? WHERE key = 'format_version'", (str(version),))
    conn.commit()
    conn.close()
    with pytest.raises(IndexCorruptError, match="invalid manifest"):
        Index.open(tmp_path / kind, read_only=True)


def test_stray_crop_rows_are_found_and_removed_and_never_block_new_images(pair, small):
    index = pair["crops"]
    top = index.store.max_id()
    with index.store.transaction():  # where the next image's views will go, a view no image has, a lost image's
        index.store.conn.executemany("INSERT INTO crop_vectors (id, vector) VALUES (?, x'00')",
                                     [((top + 1) * CROP_SLOTS,), (CROP_SLOTS + 5,), ((top + 50) * CROP_SLOTS,)])
    found = index.verify()
    assert any("3 crop-view rows belong to no image" in p for p in found.problems), found
    Image.new("RGB", (300, 200), (200, 90, 40)).save(small / "new.jpg")
    assert index.sync(small).added == 1  # its rows replace the stray one in its place
    repaired = index.verify(repair=True)
    assert any("removed 2 crop-view rows" in r for r in repaired.repaired) and index.verify().ok, repaired
    assert pair["plain"].verify().ok


def test_images_whose_ids_cannot_have_crop_views_are_refused_cleanly(pair, small):
    index = pair["crops"]
    with index.store.transaction():
        index.store.conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'images'", (1 << 61,))
    Image.new("RGB", (300, 200), (20, 160, 90)).save(small / "new.jpg")
    with pytest.raises(ImgsimError, match="out of the range"):
        index.sync(small)
    assert index.search(_grey_centre(sorted(small.iterdir())[0], 0.5), k=1)  # searching still works


def test_damaged_views_touch_only_their_own_image(pair, small):
    index = pair["crops"]
    query = index.embed(_grey_centre(sorted(small.iterdir())[1], 0.5))
    before = {r.id: r.score for r in index.search(query, k=len(index), expand=False)}
    victim = max(before, key=before.get)  # the original, lifted by its crop views
    with index.store.transaction():
        index.store.conn.execute("DELETE FROM crop_vectors WHERE id = ?", (victim * CROP_SLOTS,))
    after = {r.id: r.score for r in index.search(query, k=len(index), expand=False)}
    assert {i: s for i, s in after.items() if i != victim} == {i: s for i, s in before.items() if i != victim}


def test_a_copy_of_a_source_with_damaged_views_is_embedded(pair, small):
    index = pair["crops"]
    src = sorted(small.iterdir())[0]
    sid = index.store.conn.execute("SELECT id FROM images WHERE path = ?", (src.name,)).fetchone()[0]
    with index.store.transaction():
        index.store.conn.execute("DELETE FROM crop_vectors WHERE id = ?", (sid * CROP_SLOTS + 1,))
    shutil.copy(src, small / "zz copy.jpg")
    report = index.sync(small)
    assert (report.added, report.embedded) == (1, 1)


def test_grey_views_are_the_centre_in_grey():
    from imgsim.images import Preprocess, parse_view, to_views

    prep = Preprocess(size=32, resize_to=32, resize="squash", crop_views=("grey50", "centre50"))
    img = Image.new("RGB", (100, 80), (200, 30, 30))
    img.paste((20, 40, 220), (25, 20, 75, 60))  # the centre half blue, red around it
    views = to_views(img, prep) * np.asarray(prep.std)[:, None, None] + np.asarray(prep.mean)[:, None, None]
    whole, grey, colour = views
    assert np.ptp(grey, axis=0).max() < 1e-5  # grey: the three channels alike
    assert colour[2].mean() > 0.8 and colour[0].mean() < 0.1  # the blue centre, in colour
    expected = np.asarray(Image.new("RGB", (1, 1), (20, 40, 220)).convert("L"), np.float32)[0, 0] / 255
    assert grey[0].mean() == pytest.approx(expected, abs=2e-3)
    assert parse_view("grey70") == (70, True) and parse_view("centre50") == (50, False)
    assert parse_view("soft60") == (60, True)  # grey, and seen blurred too
    with pytest.raises(ValueError, match="crop views only"):
        Preprocess(index_views=("soft60",))


@pytest.mark.parametrize("resize, resize_to", [("squash", 64), ("crop", 73)])
def test_a_soft_views_blurred_copy_shows_the_same_centre_smaller(resize, resize_to):
    """`soft_views`: the grey centre blurred, at `SOFT_SCALE` of the input size, cut as the sharp
    view is (a "crop" model keeps the same share of it at the smaller size)."""
    from imgsim.images import SOFT_SCALE, Preprocess, soft_views, to_views

    prep = Preprocess(size=64, resize_to=resize_to, resize=resize, crop_views=("soft50",))
    img = Image.new("RGB", (200, 160), (200, 30, 30))
    img.paste((20, 40, 220), (50, 40, 150, 120))  # the centre half blue, red around it
    img.paste((250, 250, 250), (90, 70, 110, 90))  # a white spot in the middle of it
    def pixels(array):  # back to 0..1 values
        return array * np.asarray(prep.std)[:, None, None] + np.asarray(prep.mean)[:, None, None]

    sharp = pixels(to_views(img, prep)[1])
    (blurred,) = pixels(soft_views(img, prep))
    assert blurred.shape == (3, round(64 * SOFT_SCALE), round(64 * SOFT_SCALE))
    assert np.ptp(blurred, axis=0).max() < 1e-5  # grey
    assert abs(float(blurred.mean()) - float(sharp.mean())) < 0.02  # the same region: the centre, the spot's share
    assert np.std(blurred) < np.std(sharp)  # blurred
    assert soft_views(img, Preprocess(size=64, resize_to=64, crop_views=("grey50",))).shape[0] == 0


def test_an_index_with_grey_views_averaged_in_goes_through_parquet(tmp_path, photos):
    """Averaged grey views (format 5) are exported; the import keeps them and their format."""
    pytest.importorskip("pyarrow")
    from imgsim.export.parquet import export_parquet, import_parquet, read_metadata

    with Index.create(tmp_path / "g", model=TINY_MODEL, root=photos, index_views=("grey60",), crop_views=()) as index:
        index.add(photos)
        assert index.info()["format_version"] == 5
        export_parquet(index, tmp_path / "g.parquet")
    assert read_metadata(tmp_path / "g.parquet")["format_version"] == 2  # an imgsim reading only 1 refuses it
    import_parquet(tmp_path / "g.parquet", tmp_path / "imported")
    with Index.open(tmp_path / "imported") as imported:
        assert imported.manifest.preprocess.index_views == ("grey60",) and imported.info()["format_version"] == 5
        assert imported.verify().ok and len(imported) == len(list(photos.iterdir()))


def test_two_bit_codes_keep_what_a_view_is_scored_by(pair):
    """Real crop views coded in 322 bytes score as their float32 vectors do: each coded view is far
    closer to its own vector than to any other picture's, coding it again gives the same codes, a
    blob of the wrong length is refused, and one whose mean is not finite is damaged (NaN scores)."""
    index = pair["default"]
    dim = index.manifest.dim
    blobs = [b for (b,) in index.store.conn.execute("SELECT vector FROM crop_vectors ORDER BY id")]
    coded = crop_codes.decode(crop_codes.TWO_BIT, b"".join(blobs), len(blobs), dim)
    assert coded.dtype == np.float32 and coded.shape == (len(blobs), dim)
    assert [b[2:] for b in crop_codes.encode(crop_codes.TWO_BIT, coded)] == [b[2:] for b in blobs]
    assert np.allclose(np.linalg.norm(coded, axis=1), 1, atol=1e-5)
    from imgsim import images as imgs  # the same pictures' grey centres, as float32 vectors from the model

    records = sorted(index.images(), key=lambda r: r["id"])
    originals = crops.embed(index.model, [imgs.load_views(r["abspath"], index.model.preprocess)[0]
                                          for r in records])[1][:, 0]
    cosines = coded @ originals.T
    assert np.diag(cosines).mean() > 0.85 and np.all(np.argmax(cosines, axis=1) == np.arange(len(blobs)))
    with pytest.raises(ValueError, match="not 2 crop views"):
        crop_codes.decode(crop_codes.TWO_BIT, b"".join(blobs[:2])[:-1], 2, dim)
    assert crop_codes.blob_size(crop_codes.TWO_BIT, 2048) == 514 and crop_codes.blob_size(crop_codes.FLOAT16, 3) == 6
    assert len(crop_codes.encode(crop_codes.TWO_BIT, np.ones((1, 5), np.float32) / 5 ** 0.5)[0]) == 4
    nan = np.array([np.nan], "<f2").tobytes() + blobs[0][2:]
    assert list(crop_codes.damaged(crop_codes.TWO_BIT, blobs[0] + nan, 2, dim)) == [False, True]
    assert np.isnan(crop_codes.decode(crop_codes.TWO_BIT, nan, 1, dim)).all()
    # A search scores codes from dot products (`dots`): the same as the decoded views' own.
    assert np.allclose(crop_codes.dots(b"".join(blobs), len(blobs), dim, originals), originals @ coded.T, atol=1e-5)
    assert np.isnan(crop_codes.dots(blobs[0] + nan, 2, dim, originals[:1])[0, 1])
    odd = np.random.default_rng(0).normal(size=(3, 1283)).astype(np.float32)  # codes padded to whole bytes
    odd_blobs = b"".join(crop_codes.encode(crop_codes.TWO_BIT, odd / np.linalg.norm(odd, axis=1, keepdims=True)))
    assert np.allclose(crop_codes.dots(odd_blobs, 3, 1283, odd[:2]),
                       odd[:2] @ crop_codes.decode(crop_codes.TWO_BIT, odd_blobs, 3, 1283).T, atol=1e-5)
    first = index.store.conn.execute("SELECT id FROM images ORDER BY id LIMIT 1").fetchone()[0]
    with index.store.transaction():
        index.store.conn.execute("UPDATE crop_vectors SET vector = ? WHERE id = ?", (nan, first * CROP_SLOTS))
    assert index.search(_grey_centre(index.resolve(index.image(first).path), 0.5), k=3)  # passed over
    assert any("1 images' crop views are missing or damaged" in p for p in index.verify().problems)


def test_a_soft_view_is_the_grey_centre_seen_sharp_and_blurred(pair, small, tmp_path):
    """The default crop view (``soft60``) is the grey centre 60 % embedded as it is plus `SOFT_WEIGHT`
    of it blurred by `SOFT_BLUR` of the picture's width (embedded at `SOFT_SCALE` of the model's input
    size), as a 2-bit code. A tight grey crop of a blurred copy of each
    photo comes first, and scores its original higher than the sharp grey view alone (``grey60``,
    the default before) makes it."""
    from PIL import ImageFilter

    from imgsim import images as imgs

    index = pair["default"]
    prep = index.model.preprocess
    with Index.create(tmp_path / "sharp", model=BUNDLED_MODEL, root=small, crop_views="grey60") as sharp:  # a name alone
        sharp.add(small)
        gains = []
        for path in sorted(small.iterdir()):
            picture = imgs.decode(path, imgs.index_decode_size(prep)).image
            cw, ch = round(picture.width * 0.6), round(picture.height * 0.6)
            left, top = (picture.width - cw) // 2, (picture.height - ch) // 2
            centre = picture.crop((left, top, left + cw, top + ch)).convert("L").convert("RGB")
            blurred = centre.filter(ImageFilter.GaussianBlur(imgs.SOFT_BLUR * picture.width))
            small = replace(prep, size=imgs.soft_side(prep))
            both = [index.model.embed(imgs.to_array(centre, prep)[None])[0],
                    index.model.embed(imgs.to_array(blurred, small)[None])[0]]
            made = both[0] + imgs.SOFT_WEIGHT * both[1]
            image_id = next(r["id"] for r in index.images() if r["path"] == path.name)
            (blob,) = index.store.conn.execute("SELECT vector FROM crop_vectors WHERE id = ?",
                                               (image_id * CROP_SLOTS,)).fetchone()
            stored = crop_codes.decode(crop_codes.TWO_BIT, blob, 1, index.manifest.dim)[0]
            coded = crop_codes.encode(crop_codes.TWO_BIT, made[None] / np.linalg.norm(made))[0]
            assert np.mean(np.frombuffer(coded, np.uint8) == np.frombuffer(blob, np.uint8)) > 0.99  # that sum, coded
            assert stored @ made / np.linalg.norm(made) > max(stored @ both[0], stored @ both[1])
            with Image.open(path) as img:
                img.convert("RGB").filter(ImageFilter.GaussianBlur(0.01 * img.width)).save(tmp_path / "blurred.jpg")
            query = _grey_centre(tmp_path / "blurred.jpg", 0.6)
            found = index.search(query, k=3)
            assert found[0].path == path.name, (path.name, [r.path for r in found])
            own = next((r.score for r in sharp.search(query, k=3) if r.path == path.name), -1.0)
            gains.append(found[0].score - own)
    assert np.mean(gains) > 0, gains
