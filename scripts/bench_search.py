"""HNSW against an exact scan: build time, query latency and recall@10 at a given collection size.

    python scripts/bench_search.py [--n 100000] [--dim 1280] [--M 32] [--ef-construction 40 100] [--ef-search 64 128]

Vectors are clustered unit vectors (like image embeddings, which are far from uniform), queries are
perturbed members of the collection. The exact scan (FAISS IndexFlatIP, which is what a numpy
brute force or a local-mode vector database does) is the baseline in the same run.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed_search(index, queries: np.ndarray, k: int, params=None) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    ids = [index.search(q[None], k, params=params)[1][0] for q in queries]
    return (time.perf_counter() - start) / len(queries) * 1000, np.stack(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--M", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, nargs="+", default=[40, 100])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = clustered(args.n, args.dim, rng)
    picks = rng.choice(args.n, args.queries, replace=False)
    queries = x[picks] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    exact_ms, truth = timed_search(flat, queries, 10)
    print(f"{args.n} x {args.dim} clustered unit vectors, {args.queries} single queries, k=10, "
          f"{faiss.omp_get_max_threads()} threads")
    print(f"exact scan (IndexFlatIP):                       {exact_ms:8.3f} ms/query  recall@10 1.000")
    for ef_construction in args.ef_construction:
        hnsw = faiss.IndexHNSWFlat(args.dim, args.M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        start = time.perf_counter()
        hnsw.add(x)
        build = time.perf_counter() - start
        print(f"HNSW M={args.M} efConstruction={ef_construction}: built in {build:.1f} s "
              f"({args.n / build:.0f} vectors/s)")
        for ef_search in args.ef_search:
            params = faiss.SearchParametersHNSW()
            params.efSearch = ef_search
            ms, found = timed_search(hnsw, queries, 10, params)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
            print(f"  efSearch={ef_search:<4}                                  {ms:8.3f} ms/query  "
                  f"recall@10 {recall:.3f}  ({exact_ms / ms:.0f}x faster than the scan)")


if __name__ == "__main__":
    main()
