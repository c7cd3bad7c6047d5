"""Export and import rates, file sizes and peak memory at scale (imgsim export/import, issue 11).

    python scripts/bench_export.py [--count 100000] [--qdrant-count 100000] [--workdir DIR]

Makes an index of `--count` synthetic vectors shaped like real embeddings (1280-d, non-negative,
L2-normalised, clustered, as GeM-pooled EfficientNet-Lite0 features are), stored through the library
itself (Store rows and vector blobs, then the HNSW graph), and measures, each step in its own process
so that its peak memory (max RSS) is its own:
  export parquet -> import parquet (rows, then the graph) -> export qdrant of `--qdrant-count` images
  into an in-memory Qdrant client (imgsim's side of the work: reading, centring, payloads, its sync
  state; a server adds its own indexing, and local mode on disk commits every point, ~30 points/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 1280
MODEL = "efficientnet-lite0"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(work: Path, count: int) -> dict:
    from imgsim import Index
    from imgsim.store import NewImage

    rng = np.random.default_rng(0)
    centres = np.abs(rng.normal(size=(64, DIM))).astype(np.float32)
    started = time.perf_counter()
    with Index.create(work / "src", model=MODEL, root=work, crop_views=()) as index:  # synthetic vectors
        for start in range(0, count, 2000):
            n = min(2000, count - start)
            vectors = centres[rng.integers(0, 64, n)] + 0.8 * np.abs(rng.normal(size=(n, DIM))).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            images = [NewImage(f"folder{(start + i) % 97:02d}/img{start + i:07d}.jpg", 100_000 + i, 1_700_000_000 + i,
                               f"{start + i:064x}", 640, 480, "JPEG", v) for i, v in enumerate(vectors)]
            with index.store.transaction():
                index.store.insert(images)
        rows_s = time.perf_counter() - started
        index.rebuild()
    return {"step": "make", "images": count, "rows_s": round(rows_s, 1),
            "graph_s": round(time.perf_counter() - started - rows_s, 1), "peak_mb": round(peak_mb())}


def export(work: Path, count: int) -> dict:
    from imgsim import Index
    from imgsim.export.parquet import export_parquet

    started = time.perf_counter()
    with Index.open(work / "src", read_only=True) as index:
        n = export_parquet(index, work / "src.parquet")
    seconds = time.perf_counter() - started
    size = (work / "src.parquet").stat().st_size
    return {"step": "export parquet", "images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds),
            "file_mb": round(size / 1e6, 1), "bytes_per_image": round(size / n), "peak_mb": round(peak_mb())}


def import_(work: Path, count: int) -> dict:
    from imgsim import Index
    from imgsim.export import parquet

    rebuild = Index.rebuild
    timing = {}

    def timed_rebuild(self):
        timing["graph_started"] = time.perf_counter()
        rebuild(self)
        timing["graph_s"] = time.perf_counter() - timing["graph_started"]

    Index.rebuild = timed_rebuild
    started = time.perf_counter()
    n = parquet.import_parquet(work / "src.parquet", work / "imported")
    seconds = time.perf_counter() - started
    rows_s = timing["graph_started"] - started
    sqlite_mb = (work / "imported.sqlite").stat().st_size / 1e6
    faiss_mb = (work / "imported.faiss").stat().st_size / 1e6
    return {"step": "import parquet", "images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds),
            "rows_s": round(rows_s, 1), "rows_images_per_s": round(n / rows_s), "graph_s": round(timing["graph_s"], 1),
            "sqlite_mb": round(sqlite_mb, 1), "faiss_mb": round(faiss_mb, 1), "peak_mb": round(peak_mb())}


def qdrant(work: Path, count: int) -> dict:
    from imgsim import Index
    from qdrant_client import QdrantClient

    from imgsim.export.qdrant import export_qdrant
    from imgsim.export.source import Selection

    with Index.open(work / "src") as index:
        ids = index.store.ids()[:count].tolist()
        client, location = QdrantClient(location=":memory:"), "memory:bench"
        report = export_qdrant(index, client, location, "bench", selection=Selection(ids=ids))
        again = export_qdrant(index, client, location, "bench", selection=Selection(ids=ids))
        client.close()
    return {"step": "export qdrant (in-memory client)", "images": report.written, "seconds": round(report.seconds, 1),
            "images_per_s": round(report.images_per_second), "unchanged_resync_s": round(again.seconds, 2),
            "peak_mb": round(peak_mb())}


STEPS = {"make": make, "export": export, "import": import_, "qdrant": qdrant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--qdrant-count", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        count = args.qdrant_count if args.step == "qdrant" else args.count
        print(json.dumps(STEPS[args.step](args.workdir, count)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgsim-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {args.count} vectors of {DIM} dimensions in {work}, {os.cpu_count()} CPUs", flush=True)
    for step in ("make", "export", "import", "qdrant"):
        out = subprocess.run([sys.executable, __file__, "--step", step, "--workdir", str(work), "--count",
                              str(args.count), "--qdrant-count", str(args.qdrant_count)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{step} failed:\n{out.stderr}")
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
