"""What crop-view candidates (imgsim/crop_scan.py) cost a search, against the same search without them.

    python scripts/bench_crop_scan.py --n 2000 10000 20000 [--queries 200] [--workdir /tmp/imgsim-crop-scan]

For each size, a real index is built through the library as `scripts/bench_scale.py` builds one
(synthetic 1280-d vectors shaped like real pictures' features, `--spectrum 1`, one crop view each,
stored as 2-bit codes). Then, in this process, `Index.search` k=10 (the default search) with:

  - uncertain queries: random non-negative vectors that resemble nothing indexed (best score below
    `crop_scan.SCAN_BELOW`), which scan every crop view, timed in alternating rounds against the
    same queries with the scan switched off (the baseline, in the same run);
  - confident queries: near-copies of indexed vectors (bench_scale's queries), which scan nothing;
  - the first scanned search of an open index, which also reads every crop view from SQLite and
    makes the scan's tables (once per version of the index).

Prints p50 per kind, the ratio to the baseline, and the scan's memory (its codes and tables).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("IMGSIM_BENCH_SPECTRUM", "1")

import bench_scale  # noqa: E402  (after the spectrum is set: it reads it at import)


def p50(index, queries) -> float:
    ms = []
    for q in queries:
        start = time.perf_counter()
        index.search(q, k=10)
        ms.append((time.perf_counter() - start) * 1000)
    return statistics.median(ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2_000, 10_000, 20_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imgsim-crop-scan"))
    args = parser.parse_args()
    if min(args.n) < 1 or args.queries < 1 or args.rounds < 1:
        parser.error("--n, --queries and --rounds take numbers of at least 1")

    from imgsim import Index, crop_scan

    dim, seed = 1280, 0
    print(f"2 cores, load average {os.getloadavg()[0]:.1f}; k=10, the default search; {args.queries} queries a kind")
    for n in args.n:
        folder = args.workdir / f"n{n}"
        path = folder / "idx.sqlite"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            bench_scale.phase_build(str(folder / "idx"), n, dim, seed)
        confident = bench_scale.queries(n, dim, seed, args.queries, bench_scale.centres(n, dim, seed))
        rng = np.random.default_rng(7)
        uncertain = np.abs(rng.standard_normal((args.queries, dim))).astype(np.float32) ** 3
        uncertain /= np.linalg.norm(uncertain, axis=1, keepdims=True)
        with Index.open(path, read_only=True) as index:
            index.search(confident[0], k=10)  # the graph loaded
            start = time.perf_counter()
            best = index.search(uncertain[0], k=10)[0].score
            first = (time.perf_counter() - start) * 1000
            scan = index.graph._crop_scan[1]
            best_scores = [index.search(q, k=1)[0].score for q in uncertain]
            scanned = sum(s < crop_scan.SCAN_BELOW for s in best_scores)
            with_scan, without, sure = [], [], []
            for _ in range(args.rounds):
                with_scan.append(p50(index, uncertain))
                saved, crop_scan.SCAN_BELOW = crop_scan.SCAN_BELOW, -np.inf
                try:
                    without.append(p50(index, uncertain))
                finally:
                    crop_scan.SCAN_BELOW = saved
                sure.append(p50(index, confident))
        memory = 0 if scan is None else scan._pq.ntotal * scan._pq.code_size + 12 * len(scan.ids)
        print(f"{n:>7} images: uncertain queries (scanned: {scanned} of {len(uncertain)}, best score "
              f"{np.median(best_scores):.2f} median; the first {best:.2f}) p50 "
              f"{', '.join(f'{x:.2f}' for x in with_scan)} ms against {', '.join(f'{x:.2f}' for x in without)} "
              f"without the scan ({statistics.median(with_scan) / statistics.median(without):.2f}x); "
              f"confident queries {', '.join(f'{x:.2f}' for x in sure)} ms; first scanned search {first:.0f} ms; "
              f"scan tables {memory / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
