"""`imgsim serve`: the HTTP API through FastAPI's test client (no socket), with the tiny model.

Results must be the CLI's; hostile requests get JSON 4xx answers; the server follows `imgsim index`."""

from __future__ import annotations

import io
import os
import shutil
import json
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from imgsim import ImgsimError, Index  # noqa: E402
from imgsim.server import ServeSettings, create_app  # noqa: E402
from imgsim.server.errors import ApiError  # noqa: E402
from imgsim.server.uploads import read_body  # noqa: E402

from .conftest import TINY_MODEL, run, transformed_copies  # noqa: E402

LOCAL = {"base_url": "http://127.0.0.1:8000", "client": ("127.0.0.1", 50123)}


@pytest.fixture
def tiny_index(tmp_path, photos):
    path = tmp_path / "tiny"
    with Index.create(path, model=TINY_MODEL) as index:
        index.add(photos)
    return path


def make_client(index_path, **settings) -> TestClient:
    settings.setdefault("poll_seconds", 0)  # tests call check_for_update() themselves unless they say so
    app = create_app(ServeSettings(index=str(index_path), **settings))
    return TestClient(app, **LOCAL)


@pytest.fixture
def client(tiny_index):
    with make_client(tiny_index) as c:
        yield c


def upload(client, data: bytes, name="query.jpg", content_type="image/jpeg", params="", **kwargs):
    return client.post(f"/search{params}", files={"file": (name, data, content_type)}, **kwargs)


def cli_results(index_path, query_path, k) -> list[dict]:
    out = run("search", query_path, "--index", index_path, "-k", k, "--json")
    assert out.exit_code == 0, out.output
    return [json.loads(line) for line in out.stdout.splitlines()]


def without_query(result: dict) -> dict:
    """A result without what differs by design: the query's name, and the CLI's `abspath`."""
    return {key: value for key, value in result.items() if key not in ("query", "abspath")}


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


# -- search: the same answers as the command line -----------------------------------------------------
def test_search_matches_the_cli(client, tiny_index, photos, tmp_path, photo_images):
    queries = {"coffee.jpg": (photos / "coffee.jpg").read_bytes()}
    for variant, data in transformed_copies(photo_images["rocket"]).items():
        queries[f"rocket-{variant}.jpg"] = data
    turned = io.BytesIO()  # searched as is and upright, as the CLI does (imgsim/upright.py)
    photo_images["rocket"].rotate(12, Image.Resampling.BICUBIC, expand=True).save(turned, "JPEG", quality=90)
    queries["rocket-turned.jpg"] = turned.getvalue()
    for name, data in queries.items():
        query_file = tmp_path / name
        query_file.write_bytes(data)
        expected = cli_results(tiny_index, query_file, 7)
        response = upload(client, data, name=name, params="?limit=7")
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [without_query(r) for r in expected] == [
            {key: r[key] for key in without_query(expected[0])} for r in results], name
        for r in results:  # the tutorial's names beside imgsim's
            assert (r["image_id"], r["image_path"], r["similarity"], r["query"]) == (r["id"], r["path"], r["score"], name)
            assert r["thumb_url"] == f"/thumbs/{r['id']}" and r["image_url"] == f"/images/{r['id']}"


def test_limit_k_and_the_default(client, photos):
    data = (photos / "coffee.jpg").read_bytes()
    assert len(upload(client, data).json()["results"]) == 5
    assert len(upload(client, data, params="?k=3").json()["results"]) == 3
    assert len(upload(client, data, params="?limit=2&k=3").json()["results"]) == 2
    answer = upload(client, data, params="?limit=1").json()
    assert answer["results"][0]["path"] == "coffee.jpg" and answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert answer["query"] == {"filename": "query.jpg", "width": 600, "height": 400, "format": "JPEG"}
    for bad in ("?limit=0", "?k=-1", "?limit=1001", "?limit=abc"):
        response = upload(client, data, params=bad)
        assert response.status_code == 422 and response.json()["error"].startswith("invalid request: "), bad


def test_the_whole_body_may_be_the_image(client, photos):
    data = (photos / "coffee.jpg").read_bytes()
    raw = client.post("/search?limit=3", content=data, headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200
    assert [r["id"] for r in raw.json()["results"]] == [r["id"] for r in upload(client, data, params="?limit=3").json()["results"]]


def test_similar_uses_the_stored_vector_and_leaves_the_image_out(client, tiny_index, photos):
    # by the query alone (expand=false): an upload of the file finds it first, then what `similar` finds
    first = upload(client, (photos / "rocket.jpg").read_bytes(), params="?limit=6&expand=false").json()["results"]
    rocket = first[0]["id"]
    expanded = client.get(f"/similar/{rocket}?limit=5").json()["results"]
    similar = client.get(f"/similar/{rocket}?limit=5&expand=false").json()
    assert expanded[0]["id"] == similar["results"][0]["id"] and rocket not in [r["id"] for r in expanded]
    assert [r["id"] for r in similar["results"]] == [r["id"] for r in first[1:]]
    assert [r["rank"] for r in similar["results"]] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in similar["results"]] == pytest.approx([r["score"] for r in first[1:]], abs=2e-4)  # the stored float16 vector, against crop views too
    assert similar["query"]["id"] == rocket and similar["query"]["path"] == "rocket.jpg"
    assert {r["query"] for r in similar["results"]} == {"rocket.jpg"}  # as `imgsim similar --json` says
    assert client.get("/similar/999999").status_code == 404
    assert client.get("/similar/0").status_code == 422
    assert client.get(f"/similar/{2**70}").status_code == 422


def test_filters_and_dupes_answer_as_the_cli_does(tmp_path, photos):
    (photos / "sub").mkdir()
    (photos / "sub" / "coffee-copy.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    (photos / "sub" / "rocket.png").write_bytes(png_bytes(Image.open(photos / "rocket.jpg")))
    path = tmp_path / "filtered"
    with Index.create(path, model=TINY_MODEL) as index:
        index.add(photos, label_from_folder=True)
    data = (photos / "coffee.jpg").read_bytes()
    with make_client(path) as client:
        for params, flags in [("?folder=sub", ["--folder", "sub"]), ("?format=png&format=jpeg", ["--format", "png",
                              "--format", "jpeg"]), ("?label=sub&min_width=100", ["--label", "sub", "--min-width",
                              "100"]), ("?since=2000&until=2999-12", ["--since", "2000", "--until", "2999-12"]),
                              ("?min_score=0.5", ["--min-score", "0.5"])]:
            answer = upload(client, data, params=params + "&limit=5")
            assert answer.status_code == 200, (params, answer.text)
            cli = run("search", photos / "coffee.jpg", "--index", path, "-k", 5, "--json", *flags)
            expected = [without_query(json.loads(line)) for line in cli.stdout.splitlines()]
            got = [{k: v for k, v in without_query(r).items() if k in expected[0]} for r in answer.json()["results"]]
            assert got == expected and expected, params
        similar = client.get("/similar/1?format=png").json()["results"]
        assert similar and all(r["format"] == "PNG" for r in similar)
        nothing = upload(client, data, params="?folder=%27%20OR%201%3D1%20--").json()
        assert nothing["results"] == [] and nothing["note"] == "no indexed image matches the filter"
        mirrored = png_bytes(Image.open(photos / "coffee.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        unreached = upload(client, mirrored, name="m.png", content_type="image/png", params="?min_score=1").json()
        assert unreached["results"] == [] and unreached["note"] == "no result scores at least 1.0"
        assert client.get("/similar/1?label=nosuch").json()["note"] == "no indexed image matches the filter"
        assert "note" not in upload(client, data).json()  # results: nothing to explain
        bad = upload(client, data, params="?since=yesterday")
        assert bad.status_code == 400 and bad.json()["error"].startswith("not a date")
        assert upload(client, data, params="?min_width=-1").status_code == 422
        assert client.get("/info").json()["features"]["dupes"] is True
        groups = client.get("/dupes").json()["groups"]
        expected = [json.loads(line) for line in run("dupes", "--index", path, "--json").stdout.splitlines()]
        assert [[m["id"] for m in g["members"]] for g in groups] == [g["ids"] for g in expected]
        assert any(g["members"][1]["identical"] and {m["path"] for m in g["members"]} ==
                   {"coffee.jpg", "sub/coffee-copy.jpg"} for g in groups)
        assert client.get("/dupes?threshold=2").status_code == 422


# -- files by id ----------------------------------------------------------------------------------------
def test_images_and_thumbnails_by_id(client, photos):
    result = upload(client, (photos / "chelsea.jpg").read_bytes(), params="?limit=1").json()["results"][0]
    original = client.get(result["image_url"])
    assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"
    assert original.content == (photos / "chelsea.jpg").read_bytes()
    assert client.get(result["image_url"], headers={"If-None-Match": original.headers["etag"]}).status_code == 304

    thumb = client.get(result["thumb_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "max-age" in thumb.headers["cache-control"]
    small = Image.open(io.BytesIO(thumb.content))
    assert small.format == "JPEG" and max(small.size) == 320 and small.size[0] > small.size[1]
    etag = thumb.headers["etag"]
    assert client.get(result["thumb_url"]).headers["etag"] == etag
    not_modified = client.get(result["thumb_url"], headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    # A changed file gets a new thumbnail and a new ETag.
    Image.new("RGB", (64, 48), "red").save(photos / "chelsea.jpg", quality=90)
    changed = client.get(result["thumb_url"], headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert Image.open(io.BytesIO(changed.content)).size == (64, 48)


def test_only_indexed_files_are_served(client, photos):
    for path in ("/images/999999", "/thumbs/999999"):
        response = client.get(path)
        assert response.status_code == 404 and response.json() == {"error": "no image 999999 in the index"}
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e/%2e%2e/etc/passwd", "/images/-1",
                 "/thumbs/..%2Fetc", "/images/1.5", "/static/..%2F..%2F__init__.py", "/static/../app.py"):
        response = client.get(path)
        assert response.status_code in (404, 422), path
        assert "error" in response.json() or response.status_code == 404, path
        assert b"root:" not in response.content and b"import" not in response.content, path
    # An indexed file replaced by something that is not an image is not served.
    rocket = upload(client, (photos / "rocket.jpg").read_bytes(), params="?limit=1").json()["results"][0]["id"]
    (photos / "rocket.jpg").write_text("root:x:0:0:root:/root:/bin/bash\n")
    for kind in ("images", "thumbs"):
        response = client.get(f"/{kind}/{rocket}")
        assert response.status_code == 404 and b"root:" not in response.content
    (photos / "rocket.jpg").unlink()
    assert client.get(f"/images/{rocket}").status_code == 404


# -- hostile uploads --------------------------------------------------------------------------------------
def test_oversized_uploads_are_refused_before_they_are_read(tiny_index, photos):
    with make_client(tiny_index, max_upload_bytes=2_000_000) as c:
        declared = upload(c, b"\xff" * 3_000_000)
        assert declared.status_code == 413 and "larger than the limit of 2 MB" in declared.json()["error"]

        def chunks():  # no Content-Length: counted while it arrives
            for _ in range(40):
                yield b"\0" * 100_000

        streamed = c.post("/search", content=chunks(), headers={"content-type": "application/octet-stream"})
        assert streamed.status_code == 413
        assert upload(c, (photos / "coffee.jpg").read_bytes()).status_code == 200


def test_fifty_megabytes_with_the_default_limit(client):
    response = upload(client, b"\0" * 50_000_000)
    assert response.status_code == 413
    assert response.json() == {"error": "the upload is larger than the limit of 20 MB (--max-upload-mb)"}


def test_decompression_bombs_and_the_pixel_cap(client, tiny_index, photos):
    bomb = upload(client, png_claiming(40_000, 40_000), name="bomb.png", content_type="image/png")
    assert bomb.status_code == 413 and "over the limit" in bomb.json()["error"]
    under_pillow = upload(client, png_claiming(12_300, 12_300), name="bomb.png")  # 151M: over ours, under Pillow's
    assert under_pillow.status_code == 413 and "over the limit of 150,000,000" in under_pillow.json()["error"]
    with make_client(tiny_index, max_pixels=100_000) as c:  # the same cap as `imgsim index --max-pixels`
        capped = upload(c, (photos / "coffee.jpg").read_bytes())  # 600x400 = 240,000 pixels
        assert capped.status_code == 413 and "600x400 pixels is over the limit of 100,000" in capped.json()["error"]


def test_content_is_identified_by_decoding_not_by_name_or_type(client, photo_images):
    png = png_bytes(photo_images["coffee"])
    as_png = upload(client, png, name="coffee.png", content_type="image/png")
    as_txt = upload(client, png, name="notes.txt", content_type="text/plain")
    assert as_png.status_code == as_txt.status_code == 200
    assert [r["id"] for r in as_txt.json()["results"]] == [r["id"] for r in as_png.json()["results"]]
    assert as_txt.json()["query"]["format"] == "PNG"
    text = upload(client, b"just some text, not a picture\n" * 10, name="photo.jpg", content_type="image/jpeg")
    assert text.status_code == 415 and "not a readable image" in text.json()["error"]
    html = upload(client, b"<html><script>alert(1)</script></html>", name="x.png", content_type="image/png")
    assert html.status_code == 415
    truncated = upload(client, png[: len(png) // 3], name="cut.png")
    assert truncated.status_code in (415, 422) and "error" in truncated.json()


def test_malformed_requests_get_json_errors(client, photos):
    data = (photos / "coffee.jpg").read_bytes()
    wrong_field = client.post("/search", files={"image": ("a.jpg", data, "image/jpeg")})
    assert wrong_field.status_code == 400 and "no form field `file`" in wrong_field.json()["error"]
    empty = client.post("/search", files={"file": ("a.jpg", b"", "image/jpeg")})
    assert empty.status_code == 400
    no_body = client.post("/search")
    assert no_body.status_code == 400 and "no image" in no_body.json()["error"]
    broken = client.post("/search", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"})
    assert broken.status_code == 400 and "error" in broken.json()
    assert client.get("/search").status_code == 405 and client.get("/search").json() == {"error": "method not allowed"}
    assert client.get("/nothing-here").json() == {"error": "not found"}
    assert client.get("/nothing-here").status_code == 404


def test_nothing_from_an_upload_is_written_to_disk(client, photos, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    big = io.BytesIO()
    Image.effect_noise((1600, 1600), 64).convert("RGB").save(big, "PNG")  # ~5 MB: over Starlette's 1 MB spool
    assert big.tell() > 2_000_000
    assert upload(client, big.getvalue(), name="noise.png").status_code == 200
    assert list(spool.iterdir()) == []


def test_slow_uploads_time_out():
    class Slow:
        headers = {}

        async def stream(self):
            yield b"x"
            import anyio

            await anyio.sleep(5)
            yield b"y"

    async def read():
        return await read_body(Slow(), 1000, 0.2)

    import anyio

    with pytest.raises(ApiError) as e:
        anyio.run(read)
    assert e.value.status == 408


# -- who may ask ------------------------------------------------------------------------------------------
def test_without_a_token_only_this_machine_is_answered(tiny_index):
    app = create_app(ServeSettings(index=str(tiny_index), poll_seconds=0))
    remote = TestClient(app, base_url="http://127.0.0.1:8000", client=("203.0.113.7", 40000))
    response = remote.get("/info")
    assert response.status_code == 403 and "only requests from its own machine" in response.json()["error"]
    assert remote.get("/health").json() == {"status": "ok"}  # says nothing but "ok"
    rebinding = TestClient(app, base_url="http://evil.example:8000", client=("127.0.0.1", 40000))
    assert rebinding.get("/info").status_code == 403
    for name in ("http://localhost:8000", "http://[::1]:8000", "http://127.0.0.1"):
        assert TestClient(app, base_url=name, client=("127.0.0.1", 40000)).get("/info").status_code == 200
    spoofed = TestClient(app, **LOCAL).get("/info", headers={"X-Forwarded-For": "203.0.113.7"})
    assert spoofed.status_code == 200  # headers never change who the client is


def test_a_token_is_required_from_everyone_once_set(tiny_index, photos):
    token = "s3cret-token-for-tests"
    app = create_app(ServeSettings(index=str(tiny_index), host="0.0.0.0", token=token, poll_seconds=0))
    remote = TestClient(app, base_url="http://photos.example:8000", client=("203.0.113.7", 40000))
    refused = remote.get("/info")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "needs its token" in refused.json()["error"]
    assert remote.post("/search", files={"file": ("a.jpg", b"x", "image/jpeg")}).status_code == 401
    assert remote.get("/images/1").status_code == 401
    assert remote.get("/info", headers={"Authorization": "Bearer wrong-token-xx"}).status_code == 401
    assert remote.get("/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert TestClient(app, **LOCAL).get("/info").status_code == 401  # loopback too
    assert remote.get("/health").status_code == 200
    # A browser opens /?token=... once, gets a cookie, and the address bar loses the token.
    login = remote.get(f"/?token={token}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    assert "HttpOnly" in login.headers["set-cookie"] and "SameSite=Strict" in login.headers["set-cookie"]
    assert remote.get("/").status_code == 200
    assert remote.get("/thumbs/1").status_code == 200
    stranger = TestClient(app, base_url="http://photos.example:8000", client=("203.0.113.8", 40000))
    wrong = stranger.get("/?token=wrong-token-xx", follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers


def test_unsafe_settings_are_refused(tiny_index):
    for settings, message in ((dict(host="0.0.0.0"), "would let other machines"),
                              (dict(host="192.0.2.1"), "would let other machines"),
                              (dict(cors=("*",)), "lets any web page"),
                              (dict(token="short"), "at least 8")):
        with pytest.raises(ImgsimError, match=message):
            create_app(ServeSettings(index=str(tiny_index), **settings))
    result = run("serve", "--index", tiny_index, "--host", "0.0.0.0")
    assert result.exit_code == 1 and "Error: --host 0.0.0.0 would let other machines" in result.stderr
    missing = run("serve", "--index", tiny_index.parent / "nothing")
    assert missing.exit_code == 1 and "no index at" in missing.stderr


def test_cross_origin_access_only_for_named_origins(tiny_index, client):
    origin = {"Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in client.get("/info", headers=origin).headers
    assert client.get("/thumbs/1").headers["cross-origin-resource-policy"] == "same-origin"
    with make_client(tiny_index, cors=("http://app.example",)) as c:
        allowed = c.get("/info", headers={"Origin": "http://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-origin" not in c.get("/info", headers=origin).headers
        preflight = c.options("/search", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert c.get("/thumbs/1").headers["cross-origin-resource-policy"] == "cross-origin"


def test_page_docs_info_and_security_headers(client, photos):
    page = client.get("/")
    assert page.status_code == 200 and "<title>imgsim</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert client.get("/static/app.js").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text  # works offline
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/search", "/similar/{image_id}", "/images/{image_id}", "/thumbs/{image_id}", "/dupes", "/info",
            "/health"} <= set(schema["paths"])
    documented = set(schema["components"]["schemas"]["Result"]["properties"])
    assert documented == set(upload(client, (photos / "coffee.jpg").read_bytes()).json()["results"][0])
    assert "HTTPValidationError" not in json.dumps(schema["paths"])  # errors are documented as {"error": ...}
    params = {p["name"] for p in schema["paths"]["/search"]["post"]["parameters"]}
    assert {"limit", "k", "folder", "label", "format", "min_width", "since", "until", "min_score"} <= params
    info = client.get("/info").json()
    assert info["count"] == len(list(photos.glob("*.jpg")))
    assert info["model"] == TINY_MODEL and info["server"]["generation"] == 1
    assert info["limits"]["max_upload_bytes"] == 20_000_000
    assert client.get("/health").json() == {"status": "ok"}


# -- following `imgsim index` -------------------------------------------------------------------------------
def test_a_reindexed_index_is_picked_up_without_a_restart(client, tiny_index, photos, photo_images):
    shared = client.app.state.api.shared
    red = io.BytesIO()
    Image.new("RGB", (300, 200), (250, 10, 10)).save(red, "JPEG", quality=95)
    before = upload(client, red.getvalue(), params="?limit=1").json()["results"][0]
    assert before["path"] != "red.jpg"
    assert shared.check_for_update() is False
    (photos / "red.jpg").write_bytes(red.getvalue())
    (photos / "coffee.jpg").unlink()
    assert run("index", photos, "--index", tiny_index).exit_code == 0
    assert shared.check_for_update() is True
    after = upload(client, red.getvalue(), params="?limit=20").json()["results"]
    assert after[0]["path"] == "red.jpg" and after[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert "coffee.jpg" not in {r["path"] for r in after}
    assert after == upload(client, red.getvalue(), params="?limit=20").json()["results"]
    info = client.get("/info").json()
    assert info["server"]["generation"] == 2 and info["server"]["reloads"] == 1
    assert client.get(f"/images/{after[0]['id']}").content == red.getvalue()


def test_requests_are_not_dropped_while_the_index_changes(tiny_index, photos, photo_images):
    data = (photos / "camera.jpg").read_bytes()
    with make_client(tiny_index, poll_seconds=0.05) as c:  # the real watcher thread
        shared = c.app.state.api.shared
        statuses: list[int] = []
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                statuses.append(upload(c, data, params="?limit=3").status_code)
                statuses.append(c.get("/thumbs/1").status_code)

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            for round_ in range(3):
                copy = photos / f"copy-{round_}.jpg"
                photo_images["astronaut"].resize((100 + round_, 100)).save(copy, quality=90)
                assert run("index", photos, "--index", tiny_index).exit_code == 0
                deadline = time.monotonic() + 10
                while shared.generation < round_ + 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
            served = len(statuses)  # and requests go on being answered after the last swap
            deadline = time.monotonic() + 20
            while len(statuses) < served + 6 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert shared.generation == 4 and shared.reloads == 3
        assert len(statuses) >= 12 and set(statuses) == {200}, sorted(set(statuses))
        assert c.get("/info").json()["count"] == len(list(photos.glob("*.jpg")))


# -- packaging ---------------------------------------------------------------------------------------------
def test_the_core_never_imports_the_server():
    code = ("import sys, imgsim, imgsim.cli, imgsim.index; "
            "bad = [m for m in sys.modules if m.startswith(('imgsim.server', 'fastapi', 'starlette', 'uvicorn'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_serve_without_the_extra_says_what_to_install(tiny_index, monkeypatch):
    for name in list(sys.modules):
        if name.startswith("imgsim.server"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    result = run("serve", "--index", tiny_index)
    assert result.exit_code == 1
    assert "imgsim serve needs the serve extra (fastapi is missing): pip install 'imgsim[serve]'" in result.stderr


def test_a_port_in_use_is_one_error_line_before_the_index_loads(tiny_index):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--index", tiny_index, "--port", str(port))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"Error: cannot serve on 127.0.0.1:{port}: the port is in use\n", result.stderr


def test_a_file_name_that_is_not_utf8_is_answered_not_a_500(tmp_path, photos):
    """Such names are indexed; every answer that shows one is valid JSON, the name written with
    \\udcNN escapes, from which Python gets its bytes back (os.fsencode)."""
    odd = os.fsdecode(b"bad\xff\xfename.jpg")
    shutil.copy(photos / "coffee.jpg", photos / odd)
    path = tmp_path / "odd"
    with Index.create(path, model=TINY_MODEL) as index:
        index.add(photos)
        odd_id = next(r["id"] for r in index.images() if r["path"] == odd)
    with make_client(path) as c:
        found = upload(c, (photos / "coffee.jpg").read_bytes(), params="?limit=3")
        assert found.status_code == 200, found.text
        found.content.decode("utf-8")  # valid UTF-8
        assert odd in [r["path"] for r in found.json()["results"]]
        assert os.fsencode(next(r["path"] for r in found.json()["results"] if r["path"] == odd)) == \
            b"bad\xff\xfename.jpg"
        similar = c.get(f"/similar/{odd_id}")
        assert similar.status_code == 200 and similar.json()["query"]["path"] == odd
        served = c.get(f"/images/{odd_id}")  # the file itself, its name percent-encoded byte by byte
        assert served.status_code == 200 and served.content == (photos / "coffee.jpg").read_bytes()
        assert served.headers["content-disposition"].endswith("''bad%FF%FEname.jpg")
    out = run("search", photos / "coffee.jpg", "--index", path, "-k", "3", "--json")
    assert out.exit_code == 0 and odd in [json.loads(line)["path"] for line in out.stdout.splitlines()]
