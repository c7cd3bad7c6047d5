"""Time and memory of `imgsim dupes` on a large index, built through the library from synthetic vectors.

    python scripts/bench_dupes.py --n 100000            # prints build, dupes wall time, peak memory

The vectors are shaped like real embeddings (non-negative, clustered, unit length; 1280-d as the
bundled model's), and 5% of the images get a near-copy (a small perturbation of another's vector),
so there are real groups to find. Rows and vectors go in with `Store.insert` and the graph is built by
`Index`, exactly as indexing does; then `Index.duplicates()` runs in a fresh process so its peak
memory (ru_maxrss) is its own.
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

from imgsim import Index
from imgsim.models import BUNDLED_MODEL, normalize
from imgsim.store import NewImage


def synthetic(n: int, dim: int, seed: int = 0, copy_share: float = 0.05) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(max(8, n // 500), dim))).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + np.abs(rng.normal(scale=0.9, size=(n, dim))).astype(np.float32)
    copies = int(n * copy_share)
    sources = rng.choice(n - copies, copies, replace=False)
    vectors[n - copies:] = vectors[sources] + rng.normal(scale=0.08, size=(copies, dim)).astype(np.float32)
    return normalize(np.maximum(vectors, 0)), copies


def build(path: Path, n: int) -> float:
    started = time.perf_counter()
    with Index.create(path, model=BUNDLED_MODEL, root=path.parent, crop_views=()) as index:  # synthetic vectors
        vectors, _ = synthetic(n, index.manifest.dim)
        index.graph.ann  # the (empty) graph is loaded before rows exist, as indexing does
        for start in range(0, n, 5000):
            batch = [NewImage(f"synthetic/{i:07d}.jpg", 100_000 + i, i, f"{i:064x}", 640, 480, "JPEG", vectors[i])
                     for i in range(start, min(n, start + 5000))]
            with index.store.transaction():
                ids = index.store.insert(batch)
            index.graph.add(ids, vectors[start:start + len(batch)])
        index.graph.save()
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's own peak resident memory. (`ru_maxrss` would not do: Linux carries it over
    from the parent that started this process, here the one that built the index.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_dupes(path: str, sample: int = 40) -> None:
    started = time.perf_counter()
    with Index.open(path, read_only=True) as index:
        index.graph.ann
        opened = time.perf_counter() - started
        groups, threshold = index.duplicates(), index.dupes_threshold  # a kept index keeps its model's
        took = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        rss, cpu = peak_rss_mb(), usage.ru_utime + usage.ru_stime
        # Recall of the graph walk against an exact scan: every pair above the threshold that an exact
        # search finds for a sample of images must be among the pairs `dupes` grouped.
        grouped = {}
        for n, group in enumerate(groups):
            for member in group.members:
                grouped[member["id"]] = n
        ids = index.graph.ann.ids()
        rng = np.random.default_rng(1)
        expected = found = 0
        for image_id in rng.choice(ids, min(sample, len(ids)), replace=False).tolist():
            _, vector = index.graph.vectors([image_id])
            scores, near = index.graph.search(vector[0], 9, exact=True)
            for score, other in zip(scores.tolist(), near.tolist()):
                if other != image_id and score >= threshold:
                    expected += 1
                    found += grouped.get(other, -1) == grouped.get(image_id, -2)
    print(json.dumps({"open_s": round(opened, 2), "dupes_s": round(took - opened, 2),
                      "groups": len(groups), "duplicates": sum(len(g.members) - 1 for g in groups),
                      "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss), "pair_recall_vs_exact": round(found / max(1, expected), 4),
                      "exact_pairs_checked": expected, "threshold": threshold}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="build the index here and keep it (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_dupes(args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"dupes{args.n}"
        built = build(path, args.n) if not path.with_suffix(".sqlite").exists() else 0.0
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout)
        print(f"{args.n} images (5% near-copies made): build {built:.1f} s; dupes {figures['dupes_s']} s "
              f"(open {figures['open_s']} s; {figures['cpu_s']} s of CPU in all, 2 cores; load average "
              f"{os.getloadavg()[0]:.1f}), {figures['groups']} groups, {figures['duplicates']} duplicates, "
              f"peak memory {figures['peak_rss_mb']} MB; recall of pairs >= {figures['threshold']} against an exact "
              f"scan of {figures['exact_pairs_checked']} pairs: {figures['pair_recall_vs_exact']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
