"""End to end with the bundled model: real photos, altered copies, the API and the CLI agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgsim import Index
from imgsim.cli import cli
from imgsim.models import BUNDLED_MODEL

from .conftest import transformed_copies


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, photos_master):
    folder = tmp_path_factory.mktemp("idx")
    with Index.create(folder / "photos", model=BUNDLED_MODEL, root=photos_master) as index:
        report = index.add(photos_master)
    assert report.added == len(list(photos_master.iterdir()))
    return folder / "photos"


@pytest.fixture(scope="module")
def queries(tmp_path_factory, photo_images) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("queries")
    made = {}
    for name, img in photo_images.items():
        for kind, data in transformed_copies(img).items():
            path = folder / f"{name}-{kind}.jpg"
            path.write_bytes(data)
            made[(name, kind)] = path
    return made


def test_each_altered_copy_finds_its_original_first(indexed, queries):
    misses = []
    with Index.open(indexed, read_only=True) as index:
        for (name, kind), path in queries.items():
            top = index.search(path, k=3)
            if top[0].path != f"{name}.jpg":
                misses.append(f"{name}/{kind} -> {top[0].path} ({top[0].score:.3f})")
            else:
                assert top[0].score > top[1].score
    assert not misses, misses


def test_cli_json_agrees_with_the_api(indexed, queries):
    paths = [str(p) for p in list(queries.values())[:12]]
    result = CliRunner().invoke(cli, ["search", *paths, "--index", str(indexed), "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 5 * len(paths)
    assert {"query", "rank", "id", "path", "score"} <= set(lines[0])
    with Index.open(indexed, read_only=True) as index:
        for query in paths:
            from_cli = [(r["id"], r["rank"], r["score"]) for r in lines if r["query"] == query]
            from_api = [(r.id, r.rank, r.score) for r in index.search(query, k=5)]
            assert from_cli == from_api


def test_installed_console_script_runs_end_to_end(indexed, queries, tmp_path):
    query = queries[("coffee", "crop80")]
    out = subprocess.run([sys.executable, "-m", "imgsim.cli", "search", str(query), "--index", str(indexed), "-k", "1"],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    rank, score, path = out.stdout.split()
    assert rank == "1" and Path(path).name == "coffee.jpg" and 0.5 < float(score) <= 1.0


def test_search_with_a_pil_image_or_a_vector(indexed, photo_images):
    with Index.open(indexed, read_only=True) as index:
        by_image = index.search(photo_images["rocket"], k=1)[0]
        vector = index.embed(photo_images["rocket"])
        by_vector = index.search(vector, k=1)[0]
    assert by_image.path == by_vector.path == "rocket.jpg"
    assert by_image.score == pytest.approx(by_vector.score)
