"""Bad files never stop a run: each is one `skipped PATH: reason` line, kept in the errors table."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imgsim import Index

from .conftest import TINY_MODEL, run


def huge_header_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


@pytest.fixture
def messy(photos) -> Path:
    """The photo folder with every kind of trouble a real folder has, good and bad."""
    noise = Image.effect_noise((300, 300), 50).convert("RGB")
    good_png = io.BytesIO()
    noise.save(good_png, "PNG")
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "half.jpg").write_bytes(jpeg_bytes(noise)[:3000])
    (photos / "half.png").write_bytes(good_png.getvalue()[:2000])
    (photos / "letter.jpg").write_text("Dear reader, this is not a photo.")
    (photos / "bomb.png").write_bytes(huge_header_png(60000, 60000))
    os.symlink(photos / "nowhere.jpg", photos / "dangling.jpg")
    os.symlink(photos / "self.jpg", photos / "self.jpg")  # a symlink loop
    os.mkfifo(photos / "pipe.jpg")
    # These are fine and must be indexed:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green")]
    frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    Image.new("RGB", (1, 1), "white").save(photos / "dot.png")
    (photos / "cmyk.jpg").write_bytes(jpeg_bytes(noise.convert("CMYK")))
    shutil.copy(photos / "coffee.jpg", os.path.join(os.fsencode(photos), b"caf\xe9-latin1.jpg"))
    return photos


BAD = {"zero.jpg", "half.jpg", "half.png", "letter.jpg", "bomb.png", "dangling.jpg", "self.jpg", "pipe.jpg"}


def test_bad_files_are_skipped_reported_and_remembered(messy, tmp_path):
    good = len([p for p in os.listdir(messy) if p not in BAD])
    result = run("index", messy, "--index", tmp_path / "i", "--model", TINY_MODEL, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["failed"]) == (good, len(BAD))
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(BAD)
    reasons = {Path(line[len("skipped "):].split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in skipped}
    assert set(reasons) == BAD
    assert reasons["dangling.jpg"] == "broken symbolic link"
    assert "symbolic links" in reasons["self.jpg"]
    assert reasons["pipe.jpg"] == "not a regular file"
    assert "over the limit" in reasons["bomb.png"]
    assert reasons["letter.jpg"] == "not an image (unrecognised format)" and reasons["zero.jpg"] == "an empty file (0 bytes)"
    listed = run("errors", "--index", tmp_path / "i")
    assert sorted(Path(line.split(": ")[0]).name for line in listed.stdout.splitlines()) == sorted(BAD)
    with Index.open(tmp_path / "i", read_only=True) as index:
        paths = {r.path for r in index.rows()}
        assert {"anim.gif", "dot.png", "cmyk.jpg"} <= paths
        latin1 = os.fsdecode(b"caf\xe9-latin1.jpg")
        assert latin1 in paths
        assert index.search(messy / latin1, k=1)[0].path in (latin1, "coffee.jpg")
    search = run("search", os.path.join(os.fsencode(messy), b"caf\xe9-latin1.jpg").decode("utf-8", "surrogateescape"),
                 "--index", tmp_path / "i", "-k", "2")
    assert search.exit_code == 0 and "caf\ufffd-latin1.jpg" in search.stdout


def test_a_newline_in_a_file_name_keeps_one_line_per_record(tmp_path, photos):
    """Tables are one line per image: a control character in a name is shown as \\xNN; --csv
    (quoted) and --json (escaped) give the name as it is."""
    folder = tmp_path / "names"
    folder.mkdir()
    shutil.copy(photos / "coffee.jpg", folder / "new\nline.jpg")
    shutil.copy(photos / "rocket.jpg", folder / "plain.jpg")
    assert run("index", folder, "--index", tmp_path / "i", "--model", TINY_MODEL).exit_code == 0
    table = run("list", "--index", tmp_path / "i").stdout.splitlines()
    assert len(table) == 2 and table[0].endswith("new\\x0aline.jpg")
    assert run("search", folder / "new\nline.jpg", "--index", tmp_path / "i", "-k", "1").stdout.count("\n") == 1
    assert [json.loads(line)["path"] for line in run("list", "--index", tmp_path / "i", "--json").stdout.splitlines()] \
        == ["new\nline.jpg", "plain.jpg"]
    rows = list(csv.DictReader(io.StringIO(run("list", "--index", tmp_path / "i", "--csv").stdout)))
    assert [row["path"] for row in rows] == ["new\nline.jpg", "plain.jpg"]
    from imgsim.output import shown
    assert shown("a\x1b[2Jb\x9b31m") == "a\\x1b[2Jb\\x9b31m"  # no terminal escapes, 7- or 8-bit


def test_strict_exits_3_after_finishing_the_run(messy, tmp_path):
    result = run("index", messy, "--index", tmp_path / "i", "--model", TINY_MODEL, "--strict")
    assert result.exit_code == 3
    with Index.open(tmp_path / "i", read_only=True) as index:
        assert len(index) == len([p for p in os.listdir(messy) if p not in BAD])


def test_configurable_pixel_cap(photos, tmp_path):
    result = run("index", photos, "--index", tmp_path / "i", "--model", TINY_MODEL, "--max-pixels", "100000")
    assert result.exit_code == 0
    big = [p for p in photos.glob("*.jpg") if Image.open(p).width * Image.open(p).height > 100_000]
    assert 0 < len(big) < len(list(photos.glob("*.jpg")))
    assert result.stderr.count("over the limit of 100,000") == len(big)
    assert result.stdout.startswith(f"added {len(list(photos.glob('*.jpg'))) - len(big)},")


def test_a_fixed_file_leaves_the_errors_table(photos, tmp_path):
    (photos / "later.jpg").write_bytes(b"")
    run("index", photos, "--index", tmp_path / "i", "--model", TINY_MODEL)
    Image.new("RGB", (40, 40), "blue").save(photos / "later.jpg")
    run("index", photos, "--index", tmp_path / "i")
    assert run("errors", "--index", tmp_path / "i").stdout == ""


def test_unreadable_file(photos, tmp_path):
    """Permissions are checked by a process they apply to: as root, one without root's capabilities."""
    Image.new("RGB", (40, 40), "blue").save(photos / "secret.jpg")
    os.chmod(photos / "secret.jpg", 0o000)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to drop root's capabilities")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    env = {**os.environ, "IMGSIM_INDEX": str(tmp_path / "i")}
    out = subprocess.run([*prefix, sys.executable, "-m", "imgsim.cli", "index", str(photos), "--json"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"skipped {photos / 'secret.jpg'}: Permission denied" in out.stderr
    summary = json.loads(out.stdout)
    assert (summary["added"], summary["failed"]) == (len(list(photos.glob("*.jpg"))) - 1, 1)
