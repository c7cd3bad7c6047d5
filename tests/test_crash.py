"""kill -9 at random moments while indexing: the index always opens, agrees with itself, and the next
run finishes the job without embedding again what was already stored."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgsim import Index

from .tiny_model import TINY_MODEL

WORKER = Path(__file__).with_name("tiny_model.py")
IMAGES = 60
ROUNDS = 24
TIME_BUDGET_S = 150


def stored_rows(sqlite_path: Path) -> int:
    """Rows committed so far, as a reader sees them (0 before the index exists)."""
    if not sqlite_path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"{sqlite_path.as_uri()}?mode=ro", uri=True, timeout=0.1)
        try:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_at_random_moments(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(7)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(IMAGES):  # PNGs decode in full (no draft mode), which keeps each run long enough to hit
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((512, 384), Image.Resampling.NEAREST).save(folder / f"p{i:03d}.png")
    env = {**os.environ, "IMGSIM_MODELS": str(tiny_model_dir), "PYTHONPATH": str(Path(__file__).parents[1])}
    pick = random.Random(11)
    started = time.monotonic()
    rounds = []
    for round_no in range(ROUNDS):
        if time.monotonic() - started > TIME_BUDGET_S and round_no >= 20:
            break
        name = tmp_path / f"idx{round_no}"
        target = pick.choice([0, 1, pick.randint(2, IMAGES - 1), pick.randint(2, IMAGES - 1), IMAGES])
        proc = subprocess.Popen([sys.executable, str(WORKER), "-q", "index", str(folder), "--index", str(name),
                                 "--model", TINY_MODEL, "--batch-size", "4"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait on observable progress: committed rows, or the process ending by itself.
        while target and stored_rows(name.with_suffix(".sqlite")) < target and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not name.with_suffix(".sqlite").exists():
            rounds.append((target, "before create", 0))
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"idx{round_no}")]
            continue
        with Index.open(name, read_only=True) as index:  # opens, agrees with itself, searches
            stored = len(index)
            report = index.verify()
            assert report.ok, report.problems
            if stored:
                assert index.search(folder / "p000.png", k=1) != []
        with Index.open(name) as index:
            resumed = index.sync(folder)
            assert resumed.embedded == IMAGES - stored
            assert len(index) == IMAGES
            assert index.verify().ok
            top = index.search(folder / "p042.png", k=1)[0]
            assert top.path == "p042.png" and top.score > 0.999
        rounds.append((target, proc.returncode, stored))
    assert len(rounds) >= 20
    partial = [r for r in rounds if 0 < r[2] < IMAGES]
    assert len(partial) >= 5, f"too few kills landed mid-run: {rounds}"
