"""Search quality must never get worse silently: the retrieval harness (scripts/eval_retrieval.py) run
on imgsim itself, with floors set from measurement.

The floors are checked on data that is always there: the photos that ship with scikit-image, each
altered in all 15 ways of the harness (285 near-duplicate queries), searched through the real
`Index` with the bundled model. The Tux Paint stamps (Debian's tuxpaint-stamps-default) add, when
installed, a category check and a check of the hard alterations on small (300-pixel) pictures. How the floors were set, and what they catch, is in the comments.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsim.models import BUNDLED_MODEL

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


eval_data = _script("eval_data")
eval_retrieval = _script("eval_retrieval")

# Floors, measured with the bundled model and imgsim's preprocessing as of issue 5 (crop 256 -> 224,
# bilinear, average pooling), seed 0. The harness is deterministic; the margins allow for a different
# libjpeg or Pillow resampling, not for noise.
#
# Photos, every alteration of every photo (285 queries): recall@1 1.000 with trim + squash + GeM
# (0.990 with the earlier centre crop; 0.993 with `--centre-view`, issue 12). Deliberately broken preprocessing (measured on the earlier
# pipeline) gives 0.930 with 0..255 inputs (no /255), 0.968 with a 96-pixel input, 0.979 with no mean/std. A symmetric normalisation error (torchvision mean/std:
# 0.993; BGR: 0.990) does not lower near-duplicate recall, here or on the stamps, since the query
# and its original go through the same wrong pipeline: the stamps' category floor catches that.
PHOTO_RECALL_FLOOR = 0.99
# EXIF-rotated copies are the same picture: similarity 0.996 to their original (0.9935 with the learned
# whitening of efficientnet-lite0-lw, the default since issue 12's second round; 0.935 with `--centre-view`,
# whose index vectors also hold the centre 60 %); 0.805 when the EXIF orientation is ignored (they are
# still found first among 19 photos, so recall alone cannot see it). Photo recall@1 with lite0-lw: 1.000.
EXIF_SCORE_FLOOR = 0.95
# Stamps, at most 10 per label (284): category P@10 0.322 with the product's pipeline (trim, squash,
# GeM, centred scores; chance 0.029; 0.3215 with `--centre-view`); torchvision mean/std drops it to 0.300. (With the earlier centre
# crop: 0.281 vs 0.258; BGR input was not caught.) Near-duplicate recall is left to the photos.
# Since issue 12 the category queries are `Index.similar` (the picture itself left out) and searches are
# expanded by default (the query plus half of each of its 3 best matches): 0.3366 (0.3222 with
# `expand=False`, the figure above), so a search that stopped expanding would fail the floor. With the
# learned whitening of efficientnet-lite0-lw (the default model since): 0.3444 (0.3218 with `expand=False`).
STAMP_PRECISION_FLOOR = 0.34
# Small pictures (issue 12): the photos and 3 stamps per label (115 pictures) shrunk to 300 pixels wide, as
# thumbnails and web images are, each altered by the hard families at their middle strength (a blur of 1 %
# of the width, the grey centre 60 % of each side, a 15-degree turn with black corners) and by two of them
# at once (460 queries). Measured, recall@1 blur / greycrop / rot / combined: 0.991 / 0.878 / 0.965 / 0.757
# as imgsim indexed with plain efficientnet-lite0, and 0.991 / 0.991 / 0.965 / 0.800 with `imgsim index
# --centre-view` (index vectors average the whole picture and its centre 60 %); with the default model since,
# efficientnet-lite0-lw (learned whitening): 0.991 / 0.913 / 0.983 / 0.887, and with `--centre-view`
# 0.991 / 0.991 / 0.983 / 0.904. The floors are lite0-lw's, so losing the whitening fails them.
# `--centre-view` now keeps crop views (the centre 70 % and 50 % as vectors of their own, imgsim/crops.py):
# in colour, as first made, 0.991 / 0.965 / 0.983 / 0.913 here; in grey, as since, with the best 32
# candidates scored by them, 0.991 / 0.991 / 0.983 / 0.930 (README "How good is it"; floors two queries below,
# greycrop's above the colour views' 0.965). The averaged index is still checked, as indexes made that way keep it.
# Query expansion (the default since issue 12) keeps the best match first, so these figures are the same
# with and without it. Since turned queries are also searched upright (imgsim/upright.py), rot is 1.000 for
# all three (0.983 without) and combined 0.887 / 0.939 / 0.930 (0.887 / 0.930 / 0.904 without): rot's floor
# is one query below, so searching only as is fails it. Since every new index keeps one crop view, the grey
# centre 60 % (2-bit codes, imgsim/crop_codes.py), the default measures 0.991 / 1.000 / 1.000 / 0.948 here
# (floors two queries below); without crop views (`--no-centre-view`, checked as imgsim-plain) 0.991 / 0.913 /
# 1.000 / 0.887 as before; --centre-view's views in 2 bits 0.991 / 0.991 / 1.000 / 0.939 (as in float16).
# Since that view is seen blurred too (``soft60``: the blurred embedding folded in), 0.991 / 1.000 / 1.000 /
# 0.983 (the sharp view alone, ``imgsim-grey60``: 0.948); combined's floor two queries below. Since an
# uncertain search of an index this small also scans every crop view (imgsim/crop_scan.py): combined 0.991 by
# default and 0.948 with --centre-view (0.939 before); floors two queries below (one query more than the
# scan's gain here: tests/test_crop_scan.py is what fails without it).
HARD_CHECKED = ["blur-1.0", "greycrop-60", "rot-15", "hard+hard"]
HARD_FLOORS = {
    "imgsim": {"blur": 0.98, "greycrop": 0.98, "rot": 0.99, "combined": 0.97},
    "imgsim-plain": {"blur": 0.98, "greycrop": 0.90, "rot": 0.99, "combined": 0.87},
    "imgsim-crops": {"blur": 0.98, "greycrop": 0.97, "rot": 0.99, "combined": 0.93},
    "imgsim-centre60": {"blur": 0.98, "greycrop": 0.98, "rot": 0.99, "combined": 0.91},
}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-photos")
    counts = eval_data.build(folder, with_stamps=False)
    assert len(counts) >= 15, "scikit-image should ship at least 15 of the photos"
    return folder


@pytest.fixture(scope="module")
def photo_report(photo_folder, tmp_path_factory) -> dict:
    return eval_retrieval.run(photo_folder, configs=["imgsim"], model=BUNDLED_MODEL, per_image=None,
                              index_path=tmp_path_factory.mktemp("eval-index") / "photos", log=_quiet)


def _misses(result: dict) -> list[str]:
    return [f"{m['kind']} {m['original']} ({m['detail']}) -> {m['top1']}" for m in result["misses"]]


def test_photos_near_duplicate_recall_stays_above_its_floor(photo_report):
    (result,) = photo_report["results"]
    assert photo_report["near_duplicate_queries"] == photo_report["images"] * len(eval_retrieval.ALTERATIONS)
    assert result["nd_recall_at_1"] >= PHOTO_RECALL_FLOOR, _misses(result)


def test_photos_exif_rotated_copies_are_seen_upright(photo_report):
    (result,) = photo_report["results"]
    assert result["per_alteration_recall_at_1"]["exif"] == 1.0, _misses(result)
    assert result["per_alteration_original_score"]["exif"] >= EXIF_SCORE_FLOOR


@pytest.mark.skipif(not eval_data.STAMPS_ROOT.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_stamps_category_precision_stays_above_its_floor(tmp_path):
    folder = tmp_path / "stamps"
    eval_data.build(folder, with_photos=False, per_class=10)
    report = eval_retrieval.run(folder, configs=["imgsim"], model=BUNDLED_MODEL, per_image=0, log=_quiet)
    (result,) = report["results"]
    assert report["near_duplicate_queries"] == 0
    assert result["category_p_at_10"] >= STAMP_PRECISION_FLOOR
    assert result["category_p_at_10"] > 5 * result["chance_p_at_10"]


@pytest.fixture(scope="module")
def small_hard_report(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("eval-small")
    eval_data.build(folder, per_class=3)
    return eval_retrieval.run(folder, configs=list(HARD_FLOORS), model=BUNDLED_MODEL, per_image=0,
                              hard=HARD_CHECKED, width=300, log=_quiet)


@pytest.mark.skipif(not eval_data.STAMPS_ROOT.is_dir(), reason="tuxpaint-stamps-default is not installed")
@pytest.mark.parametrize("config", sorted(HARD_FLOORS))
@pytest.mark.parametrize("family", sorted(HARD_FLOORS["imgsim"]))
def test_small_pictures_hard_alterations_stay_above_their_floors(small_hard_report, config, family):
    result = next(r for r in small_hard_report["results"] if r["config"] == config)
    counts = small_hard_report["queries_per_alteration"]
    assert set(counts) == set(HARD_CHECKED) and small_hard_report["width"] == 300
    recall = eval_retrieval.family_recall(result["per_alteration_recall_at_1"], counts, family)
    assert recall >= HARD_FLOORS[config][family], \
        [m for m in _misses(result) if eval_retrieval.family(m.split()[0]) == family]


# -- the harness itself -------------------------------------------------------------------------------

def test_alterations_are_seeded_and_independent_of_the_sample(photo_folder, tmp_path):
    items = eval_retrieval.load_dataset(photo_folder)
    full = eval_retrieval.make_queries(items, tmp_path / "a", per_image=3, seed=7)
    again = eval_retrieval.make_queries(items, tmp_path / "b", per_image=3, seed=7)
    assert [q.path.read_bytes() for q in full] == [q.path.read_bytes() for q in again]
    one = eval_retrieval.make_queries(items[3:4], tmp_path / "c", per_image=3, seed=7)
    assert [(q.kind, q.path.read_bytes()) for q in one] == [(q.kind, q.path.read_bytes()) for q in full[9:12]]
    other = eval_retrieval.make_queries(items[3:4], tmp_path / "d", per_image=3, seed=8)
    assert [q.path.read_bytes() for q in other] != [q.path.read_bytes() for q in one]


def test_byte_identical_files_count_as_the_same_original(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    (tmp_path / "a" / "one.png").write_bytes(b"1")
    (tmp_path / "b" / "copy.png").write_bytes(b"1")
    (tmp_path / "b" / "two.png").write_bytes(b"2")
    (tmp_path / "loose.png").write_bytes(b"3")
    items = eval_retrieval.load_dataset(tmp_path)
    assert [(it.key, it.label, it.group) for it in items] == [
        ("a/one.png", "a", 0), ("b/copy.png", "b", 0), ("b/two.png", "b", 1), ("loose.png", None, 2)]
    queries = [eval_retrieval.Query(Path("q0.jpg"), 0, "jpeg", ""), eval_retrieval.Query(Path("q1.jpg"), 2, "grey", "")]
    # q0 (altered one.png) finds copy.png, then one.png: a hit, AP 1. q1 (two.png) finds it second: AP 1/2.
    cat_queries, chance = eval_retrieval.category_queries(items)
    assert cat_queries == [1, 2]  # one.png has no other picture of label a: copy.png is the same picture
    assert chance == pytest.approx((1 / 2 + 1 / 3) / 2)
    result = eval_retrieval.score_rankings(
        "x", items, queries, [np.array([1, 0, 2, 3]), np.array([3, 2, 0, 1])],
        cat_queries, [np.array([2, 3]), np.array([3, 0, 1])], chance, 0.0, 0.0)
    assert result.nd_recall_at_1 == 0.5
    assert result.nd_map == pytest.approx((1.0 + 0.5) / 2)
    assert result.per_alteration == {"jpeg": 1.0, "grey": 0.0}
    assert result.category_p_at_10 == pytest.approx(0.1)


def test_hard_alterations_do_what_they_say(tmp_path):
    img = Image.new("RGB", (300, 200), (200, 30, 30))
    rng = np.random.default_rng(0)
    crop = eval_retrieval.HARD_ALTERATIONS["greycrop-60"](img, rng).image
    assert crop.size == (180, 120) and len(set(crop.getpixel((90, 60)))) == 1
    turned = eval_retrieval.HARD_ALTERATIONS["rot-15"](img, rng).image
    assert turned.width > 300 and turned.getpixel((0, 0)) == (0, 0, 0)
    assert eval_retrieval.unrotate(img.rotate(15, expand=True), 15).size == pytest.approx((300, 200), abs=2)
    assert [eval_retrieval.family(k) for k in ("blur-1.5", "greycrop-50", "rot-10", "hard+hard", "grey")] == [
        "blur", "greycrop", "rot", "combined", "grey"]
    items = eval_retrieval.load_dataset(_one_photo(tmp_path))
    small = eval_retrieval.shrink_originals(items, 120, tmp_path / "small")
    assert Image.open(small[0].path).width == 120 and small[0].key == items[0].key


def _one_photo(tmp_path: Path) -> Path:
    folder = tmp_path / "one" / "label"
    folder.mkdir(parents=True)
    Image.new("RGB", (400, 300), (10, 120, 200)).save(folder / "a.jpg")
    return tmp_path / "one"


def test_configuration_names_parse():
    c = eval_retrieval.Config.parse("squash224+320-gem3-mirror-white0.3-trim")
    assert (c.resize, c.sizes, c.pool, c.mirror, c.whiten, c.trim) == ("squash", (224, 320), 3.0, "index", 0.3, True)
    assert eval_retrieval.Config.parse("crop224-max").pool == float("inf")
    with pytest.raises(ValueError):
        eval_retrieval.Config.parse("crop224-gem3-wobble")
    c = eval_retrieval.Config.parse("squash224-gem3-rmac3-qmirror-dbcentre60-center-qe2")
    assert (c.regions, c.query_mirror, c.extra, c.query_expansion) == (3, True, (("db", "centre60"),), 2)
    assert c.groups("db") == [["", "centre60"]] and c.groups("q") == [["", "mirror"]]
    assert eval_retrieval.Config.parse("squash224-gem3-qunrot15").groups("q") == [[""], ["unrot+15"], ["unrot-15"]]
