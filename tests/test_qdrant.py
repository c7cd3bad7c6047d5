"""`imgsim export qdrant` into Qdrant's local mode: the top-10 for real query photos equals imgsim's
exact search, a second export moves only the difference, an export killed midway ends consistent
when run again, and transient failures are retried."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance, ImageOps
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from imgsim import ImgsimError, Index
from imgsim.cli import cli
from imgsim.export import query_vector
from imgsim.export.qdrant import connect, export_qdrant
from imgsim.export.state import query_centre
from imgsim.models import normalize

from .conftest import transformed_copies
from .test_parquet import noise_images
from .tiny_model import TINY_MODEL

WORKER = Path(__file__).with_name("tiny_model.py")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def variants(img: Image.Image) -> dict[str, Image.Image]:
    """Fifteen distinct pictures made from one photo: crops, turns, mirror, tones."""
    w, h = img.size
    out = {}
    for scale in (0.9, 0.75, 0.6):
        cw, ch = int(w * scale), int(h * scale)
        for name, (x, y) in {"tl": (0, 0), "br": (w - cw, h - ch), "c": ((w - cw) // 2, (h - ch) // 2)}.items():
            out[f"crop{int(scale * 100)}{name}"] = img.crop((x, y, x + cw, y + ch))
    out["mirror"] = ImageOps.mirror(img)
    out["rot7"] = img.rotate(7, expand=True)
    out["rot-12"] = img.rotate(-12, expand=True)
    out["grey"] = ImageOps.grayscale(img).convert("RGB")
    out["dark"] = ImageEnhance.Brightness(img).enhance(0.6)
    out["contrast"] = ImageEnhance.Contrast(img).enhance(1.6)
    return out


def exact_top(index: Index, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """imgsim's exact search: every stored vector scored as imgsim scores (centred from 200 images on)."""
    ids, vectors = [], []
    for batch_ids, batch in index.store.vectors(index.store.manifest()["dim"]):
        ids.extend(batch_ids.tolist())
        vectors.append(batch)
    matrix = np.concatenate(vectors)
    center = index.store.manifest().get("center")
    if center is not None:
        center = np.asarray(center, np.float32)
        matrix, query = normalize(matrix - center), normalize((query - center)[None])[0]
    scores = matrix @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def points(path: Path, collection: str) -> dict[int, tuple[dict, np.ndarray]]:
    client = QdrantClient(path=str(path))
    try:
        found, offset = {}, None
        while True:
            records, offset = client.scroll(collection, limit=256, offset=offset, with_payload=True, with_vectors=True)
            for r in records:
                found[int(r.id)] = (r.payload, np.asarray(r.vector, np.float32))
            if offset is None:
                return found
    finally:
        client.close()


def points_of_client(client) -> list[int]:
    return [int(r.id) for r in client.scroll("idx", limit=10_000, with_payload=False)[0]]


def assert_consistent(index_name: Path, qdrant_path: Path, collection: str) -> None:
    """Qdrant holds exactly the index's images, with their paths and their (centred) vectors, and the
    index's record of the export says so."""
    got = points(qdrant_path, collection)
    with Index.open(index_name, read_only=True) as index:
        rows = {r.id: r for r in index.rows()}
        centre = query_centre(index.store)
        stored = dict(zip(*next(index.store.vectors(index.store.manifest()["dim"], chunk=100_000))))
        recorded = index.store.conn.execute("SELECT image_id, fingerprint FROM export_points").fetchall()
    assert sorted(got) == sorted(rows)
    for image_id, (payload, vector) in got.items():
        assert payload["path"] == rows[image_id].path and payload["sha256"] == rows[image_id].sha256
        expected = stored[image_id] if centre is None else normalize((stored[image_id] - centre)[None])[0]
        np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert sorted(i for i, _ in recorded) == sorted(rows)
    assert all(fp is not None for _, fp in recorded)


@pytest.fixture(scope="module")
def photo_collection(tmp_path_factory, photo_images):
    """210 distinct pictures made from skimage's photos, indexed with the bundled EfficientNet-Lite0
    (so scores are centred), and held-out query photos."""
    folder = tmp_path_factory.mktemp("variants")
    queries = tmp_path_factory.mktemp("queries")
    for name, img in photo_images.items():
        for variant, picture in variants(img).items():
            picture.save(folder / f"{name}-{variant}.jpg", quality=90)
        for kind, data in transformed_copies(img).items():
            if kind in ("jpeg40", "crop80", "exif-rotated"):
                (queries / f"{name}-{kind}.jpg").write_bytes(data)
    name = tmp_path_factory.mktemp("index") / "photos"
    with Index.create(name, model="efficientnet-lite0") as index:
        index.sync(folder)
        assert len(index) >= 200
    return name, sorted(queries.iterdir())


def test_top10_for_real_photos_equals_exact_search(tmp_path, photo_collection):
    name, queries = photo_collection
    qdrant = tmp_path / "qdrant"
    result = run("export", "qdrant", "--path", qdrant, "--index", name, "--collection", "photos")
    assert result.exit_code == 0, result.output
    client = QdrantClient(path=str(qdrant))
    try:
        info = client.get_collection("photos")
        assert info.config.params.vectors.size == 1280
        assert str(info.config.params.vectors.distance).lower().endswith("cosine")
        assert info.config.metadata["imgsim"]["model"] == "efficientnet-lite0"
        with Index.open(name, read_only=True) as index:
            assert index.store.manifest()["center"] is not None
            centre = query_centre(index.store)
            for number, query in enumerate(queries):
                if number < 3:  # the command line, as the README shows it
                    embedded = run("embed", query, "--index", name, "--json")
                    assert embedded.exit_code == 0, embedded.output
                    data = json.loads(embedded.output)
                    assert data["centred"] is True
                    vector = data["vector"]
                else:  # Python, as the README shows it
                    vector = query_vector(index, query)
                    np.testing.assert_allclose(vector, normalize((index.embed(query) - centre)[None])[0], atol=1e-6)
                hits = client.query_points("photos", query=vector, limit=10).points
                expected_ids, expected_scores = exact_top(index, index.embed(query), 10)
                assert [int(h.id) for h in hits] == expected_ids, query.name
                np.testing.assert_allclose([h.score for h in hits], expected_scores, atol=1e-5)
                assert [r.id for r in index.search(query, k=10, expand=False)] == expected_ids  # the query alone
                assert hits[0].payload["path"].split("-")[0] == query.name.split("-")[0]
            raw = json.loads(run("embed", queries[0], "--index", name, "--json", "--raw").output)
            assert raw["centred"] is False
            np.testing.assert_allclose(raw["vector"], index.embed(queries[0]), atol=1e-6)
    finally:
        client.close()
    assert_consistent(name, qdrant, "photos")


def test_uncentred_index_matches_too(tmp_path, photos):
    name = tmp_path / "small"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(photos)
        client, location = connect(path=str(tmp_path / "q"))
        report = export_qdrant(index, client, location, "small")
        assert report.written == len(index) and report.created
        for query in ("coffee.jpg", "rocket.jpg"):
            vector = index.embed(photos / query)
            hits = client.query_points("small", query=vector, limit=10).points
            assert [int(h.id) for h in hits] == exact_top(index, vector, 10)[0]
        client.close()


def test_second_export_moves_only_the_difference(tmp_path, photos):
    folder = noise_images(tmp_path / "pictures", 230)
    name = tmp_path / "idx"
    qdrant = tmp_path / "qdrant"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(folder)
    first = run("export", "qdrant", "--path", qdrant, "--index", name, "--json")
    assert first.exit_code == 0, first.output
    assert '"written": 230' in first.output
    assert_consistent(name, qdrant, "idx")

    files = sorted(folder.iterdir())
    files[0].unlink()                                              # removed
    files[1].rename(folder / "moved.png")                          # moved: same id, new path
    Image.open(files[2]).rotate(90).save(files[2])                 # changed: a new id replaces the old
    noise_images(folder, 2, seed=99)                               # added
    with Index.open(name) as index:
        report = index.sync(folder)
        assert (report.added, report.removed, report.moved, report.updated) == (2, 1, 1, 1)
    with Index.open(name) as index:
        client, location = connect(path=str(qdrant))
        try:
            second = export_qdrant(index, client, location, "idx")
        finally:
            client.close()
    assert not second.recentred
    assert (second.written, second.deleted) == (4, 2)       # 2 added + moved + changed; removed + changed's old id
    assert second.unchanged == 230 - 3 and second.points == 231
    assert_consistent(name, qdrant, "idx")

    third = run("export", "qdrant", "--path", qdrant, "--index", name, "--json")
    assert '"written": 0, "deleted": 0' in third.output
    again = run("export", "qdrant", "--path", qdrant, "--index", name, "--recentre", "--json")
    assert '"written": 231' in again.output and '"recentred": true' in again.output
    assert_consistent(name, qdrant, "idx")

    client = QdrantClient(path=str(qdrant))  # points deleted behind the index's back are sent again
    from qdrant_client import models
    client.delete("idx", points_selector=models.PointIdsList(points=sorted(points_of_client(client))[:5]))
    client.close()
    healed = run("export", "qdrant", "--path", qdrant, "--index", name, "--json")
    assert '"written": 231' in healed.output, healed.output
    assert_consistent(name, qdrant, "idx")


class Flaky:
    """A client whose calls fail as a network does, `failures` times each, before they go through."""

    def __init__(self, client, failures: dict[str, list[Exception]]):
        self.client = client
        self.failures = failures
        self.calls: list[str] = []

    def __getattr__(self, method):
        real = getattr(self.client, method)

        def call(*args, **kwargs):
            self.calls.append(method)
            pending = self.failures.get(method)
            if pending:
                raise pending.pop(0)
            return real(*args, **kwargs)

        return call


def test_transient_failures_are_retried_with_backoff(tmp_path, photos):
    name = tmp_path / "idx"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(photos)
        client, location = connect(path=str(tmp_path / "q"))
        busy = UnexpectedResponse(503, "Service Unavailable", b"", None)
        flaky = Flaky(client, {"upsert": [ResponseHandlingException(ConnectionError("reset")), busy],
                               "collection_exists": [ResponseHandlingException(TimeoutError("timed out"))]})
        slept = []
        report = export_qdrant(index, flaky, location, "idx", batch_size=5, sleep=slept.append)
        assert report.written == len(index)
        assert len(slept) == 3 and slept[2] > slept[0]
        refused = Flaky(client, {"upsert": [UnexpectedResponse(400, "Bad Request", b'{"status":"bad"}', None)]})
        index.store.conn.execute("UPDATE images SET format = 'PNG' WHERE id = 1")  # something to send
        with pytest.raises(ImgsimError, match="refused upsert: HTTP 400"):
            export_qdrant(index, refused, location, "idx", sleep=slept.append)
        down = Flaky(client, {"collection_exists": [ResponseHandlingException(ConnectionError("refused"))] * 10})
        with pytest.raises(ImgsimError, match="failed 3 times .*resumes where it stopped"):
            export_qdrant(index, down, location, "other", retries=2, sleep=slept.append)
        # A host name that does not exist is not retried (a resolver that is down for now, EAI_AGAIN, is).
        import socket

        def lookup(errno_, message):
            try:
                raise socket.gaierror(errno_, message)
            except socket.gaierror as cause:
                try:
                    raise ConnectionError(message) from cause
                except ConnectionError as e:
                    return ResponseHandlingException(e)

        slept.clear()
        nowhere = Flaky(client, {"collection_exists": [lookup(socket.EAI_NONAME, "Name or service not known")] * 5})
        with pytest.raises(ImgsimError, match="cannot reach Qdrant .*no such host .*check the URL"):
            export_qdrant(index, nowhere, location, "other", sleep=slept.append)
        assert slept == []
        later = Flaky(client, {"collection_exists": [lookup(socket.EAI_AGAIN, "Temporary failure in name resolution")]})
        assert export_qdrant(index, later, location, "other", batch_size=50, sleep=slept.append).written == len(index)
        assert len(slept) == 1
        client.close()


@pytest.mark.parametrize("die_at", [("upsert", 3), ("confirm", 2), ("delete", 1), ("forget", 1)])
def test_export_interrupted_anywhere_ends_consistent(tmp_path, die_at):
    """Dies (as a kill would: no further call runs) after the n-th Qdrant write or state update."""
    from imgsim.export import state as state_module

    folder = noise_images(tmp_path / "pictures", 40)
    name = tmp_path / "idx"
    qdrant = tmp_path / "qdrant"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(folder)
    assert run("export", "qdrant", "--path", qdrant, "--index", name).exit_code == 0
    for f in sorted(folder.iterdir())[:12]:
        f.unlink()
    noise_images(folder, 25, seed=5)
    with Index.open(name) as index:
        index.sync(folder)

    class Killed(BaseException):
        pass

    where, after = die_at
    count = {"n": 0}

    def dying(original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            count["n"] += 1
            if count["n"] == after:
                raise Killed
            return result
        return wrapper

    with Index.open(name) as index, pytest.MonkeyPatch.context() as patch:
        client, location = connect(path=str(qdrant))
        try:
            target = client
            if where in ("upsert", "delete"):
                target = Flaky(client, {})
                setattr(target, where, dying(getattr(client, where)))
            else:
                patch.setattr(state_module.SyncState, where, dying(getattr(state_module.SyncState, where)))
            with pytest.raises(Killed):
                export_qdrant(index, target, location, "idx", batch_size=4)
        finally:
            client.close()
    result = run("export", "qdrant", "--path", qdrant, "--index", name, "--json")
    assert result.exit_code == 0, result.output
    assert_consistent(name, qdrant, "idx")


def test_export_killed_with_sigkill_resumes(tmp_path, tiny_model_dir):
    folder = noise_images(tmp_path / "pictures", 400)
    name = tmp_path / "idx"
    qdrant = tmp_path / "qdrant"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(folder)
    env = {**os.environ, "IMGSIM_MODELS": str(tiny_model_dir), "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, str(WORKER), "-q", "export", "qdrant", "--path", str(qdrant), "--index", str(name),
               "--batch-size", "2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    recorded = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            conn = sqlite3.connect(f"{Path(str(name) + '.sqlite').as_uri()}?mode=ro", uri=True, timeout=0.05)
            recorded = conn.execute("SELECT count(*) FROM export_points").fetchone()[0]
            conn.close()
        except sqlite3.Error:
            pass
        if recorded >= 20:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < recorded < 400, "the export should have been killed midway"
    assert 0 < len(points(qdrant, "idx")) < 400
    resumed = subprocess.run(command[:-1] + ["64"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_consistent(name, qdrant, "idx")
    shutil.rmtree(qdrant)


def test_refuses_a_foreign_or_mismatched_collection(tmp_path, photos):
    name = tmp_path / "idx"
    with Index.create(name, model=TINY_MODEL) as index:
        index.sync(photos)
    client = QdrantClient(path=str(tmp_path / "q"))
    from qdrant_client import models

    client.create_collection("other", vectors_config=models.VectorParams(size=48, distance=models.Distance.COSINE))
    client.upsert("other", [models.PointStruct(id=1, vector=[1.0] * 48)])
    client.create_collection("wrong", vectors_config=models.VectorParams(size=12, distance=models.Distance.DOT))
    client.close()
    result = run("export", "qdrant", "--path", tmp_path / "q", "--index", name, "--collection", "other")
    assert result.exit_code == 1
    assert result.output == ("Error: Qdrant collection other already holds 1 points that this index did not export: "
                             "choose another --collection, or --recreate it\n")
    result = run("export", "qdrant", "--path", tmp_path / "q", "--index", name, "--collection", "wrong")
    assert result.exit_code == 1 and "holds 12-d vectors" in result.output
    result = run("export", "qdrant", "--path", tmp_path / "q", "--index", name, "--collection", "other", "--recreate")
    assert result.exit_code == 0, result.output
    assert run("export", "qdrant", "--index", name).exit_code == 2
    result = run("export", "qdrant", "--url", "http://127.0.0.1:1", "--api-key-env", "IMGSIM_NO_SUCH_VAR",
                 "--index", name)
    assert result.output == "Error: environment variable IMGSIM_NO_SUCH_VAR is not set\n"


def test_export_centre_is_renewed_only_past_the_tolerance(tmp_path, photos):
    from imgsim.export.state import SyncState, centre_drift

    with Index.create(tmp_path / "idx", model=TINY_MODEL) as index:
        state = SyncState(index.store)
        assert state.export_centre(None, 0.02) == (1, None, False)        # below 200 images: no centre
        assert state.export_centre(None, 0.02)[:2] == (1, None)
        centre = np.full(48, 0.1, np.float32)
        version, got, replaced = state.export_centre(centre, 0.02)
        assert version == 2 and replaced and np.array_equal(got, centre)
        nudged = centre + np.float32(0.001)
        assert centre_drift(nudged, centre) < 0.02
        assert state.export_centre(nudged, 0.02)[0] == 2                  # a small change keeps the old one
        moved = centre + np.float32(0.05)
        assert centre_drift(moved, centre) > 0.02
        version, got, replaced = state.export_centre(moved, 0.02)
        assert version == 3 and replaced and np.array_equal(got, moved)
        assert state.export_centre(moved, 0.02, force=True)[0] == 4
