"""Scale figures: real imgsim indexes of 100k and 1M images, built and searched through the library.

    python scripts/bench_scale.py --n 100000 1000000 --workdir /tmp/imgsim-scale [--keep]

Synthetic vectors shaped like efficientnet-lite0's GeM features (1280-d, clustered, non-negative as
after ReLU, unit norm) are stored under that model with `Store.insert` and `Graph.add`, exactly as
`Index.add` stores embeddings, so the files are real imgsim indexes and the real CLI can search
them with the real bundled model. Each phase runs in its own process, so that its peak memory
(ru_maxrss, from wait4) is its own. Printed for each size, in one run:

  - size on disk per image (FAISS + SQLite files),
  - build: wall time and peak memory (insert into SQLite in batches, add to the graph, save),
  - open: `Index.open` read-only, then the first search (which loads the graph),
  - `Index.search` with a vector, k=10: p50/p99 unfiltered and with a 1% folder filter, the
    process's peak memory, and recall@10 against an exact float32 scan (same centred cosine the
    index scores with) computed in the same run,
  - `imgsim search photo.jpg` from a cold process (real model, real photo): wall time and peak memory.

`--crop-views` says which crop views the indexes keep: ``default`` (as `imgsim index` makes them: one,
the grey centre 60 % seen sharp and blurred, `soft60`), ``centre`` (`--centre-view`: two) or ``none``
(`--no-centre-view`). Synthetic ones: the image's own vector plus noise, made unit length and stored
as the index stores crop views (2-bit codes): what is measured is their cost on disk and in a search,
not what they find.

Figures are noisy on a shared machine: compare sizes within one run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MODEL = "efficientnet-lite0"
FOLDERS = 100  # image i lives in folder f{i % 100}: a one-folder filter keeps 1%
CHUNK = 10_000
CLUSTER_SIZE = 50


# -- synthetic embeddings ------------------------------------------------------------------------
CROP_VIEWS = os.environ.get("IMGSIM_BENCH_CROP_VIEWS", "default")
"""Which crop views the indexes keep (`--crop-views`): default, centre or none."""

SPECTRUM = float(os.environ.get("IMGSIM_BENCH_SPECTRUM", "0"))
"""0: every direction varies as much as any other (isotropic: the default, and the hardest case for
a graph over fewer dimensions). a > 0: the k-th main direction's variance falls as k^-a, in a fixed
random basis; lite0 features of real pictures measured a ~ 1.05 (475 distinct pictures; the top
256 of 1280 directions held 85-93% of their variance), so `--spectrum 1` is the realistic case."""


def _shape(g: np.ndarray, seed: int) -> np.ndarray:
    """Standard normal rows given the spectrum `SPECTRUM` (same total variance), or as they are."""
    if not SPECTRUM:
        return g
    scale, basis = _spectrum_basis(g.shape[1], seed)
    return (g * scale) @ basis.T


@functools.lru_cache(maxsize=2)
def _spectrum_basis(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    basis = np.linalg.qr(np.random.default_rng([seed, 9]).standard_normal((dim, dim)))[0].astype(np.float32)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-SPECTRUM / 2)
    return (scale / np.sqrt(np.mean(scale ** 2))).astype(np.float32), basis


def centres(n: int, dim: int, seed: int) -> np.ndarray:
    """Cluster centres: sparse, non-negative, heavy-tailed (as post-ReLU GeM features are)."""
    rng = np.random.default_rng([seed, 0])
    c = _shape(rng.standard_normal((max(1, n // CLUSTER_SIZE), dim), dtype=np.float32), seed)
    return np.maximum(c, 0) ** 1.5


def vectors(start: int, count: int, n: int, dim: int, seed: int, c: np.ndarray) -> np.ndarray:
    """Vectors start..start+count of a collection of n: a centre plus noise, clipped at 0, unit norm.
    Chunks are generated independently (seeded by their start), so any part can be made again."""
    rng = np.random.default_rng([seed, 1, start])
    which = rng.integers(0, len(c), count)
    x = np.maximum(c[which] + 0.7 * _shape(rng.standard_normal((count, dim), dtype=np.float32), seed), 0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def queries(n: int, dim: int, seed: int, count: int, c: np.ndarray) -> np.ndarray:
    """Perturbed members of the collection (a re-encoded or edited copy of an indexed photo)."""
    rng = np.random.default_rng([seed, 2])
    picks = np.sort(rng.choice(n, count, replace=False))
    base = np.empty((count, dim), np.float32)
    for first in np.unique(picks // CHUNK * CHUNK):
        inside = picks // CHUNK * CHUNK == first
        base[inside] = vectors(int(first), min(CHUNK, n - int(first)), n, dim, seed, c)[picks[inside] - first]
    q = np.maximum(base + 0.01 * rng.standard_normal(base.shape, dtype=np.float32), 0)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# -- phases, each run in a child process -------------------------------------------------------
def phase_build(path: str, n: int, dim: int, seed: int, ef_construction: int = 0, add_batch: int = CHUNK) -> dict:
    from imgsim import Index
    from imgsim.ann import HnswParams
    from imgsim.store import NewImage

    root = Path(path).parent / "images"
    root.mkdir(parents=True, exist_ok=True)
    c = centres(n, dim, seed)
    start = time.perf_counter()
    t_sql = t_graph = 0.0
    hnsw = HnswParams(ef_construction=ef_construction) if ef_construction else None
    from imgsim import crop_codes
    from imgsim.crops import CROP_VIEWS as CENTRE, DEFAULT_CROP_VIEWS

    views = {"default": DEFAULT_CROP_VIEWS, "centre": CENTRE, "none": ()}[CROP_VIEWS]
    rng = np.random.default_rng([seed, 7])
    with Index.create(path, model=MODEL, root=root, hnsw=hnsw, crop_views=views) as index:
        assert index.manifest.dim == dim, f"{MODEL} has {index.manifest.dim} dimensions, not {dim}"
        store, graph = index.store, index.graph
        code = index.manifest.preprocess.crop_code
        graph.ann  # loaded before rows exist, as `Index.add` does, so that no row is added twice
        for first in range(0, n, CHUNK):
            count = min(CHUNK, n - first)
            x = vectors(first, count, n, dim, seed, c)
            crops = None
            if views:
                crops = x[:, None] + rng.normal(0, 0.02, (count, len(views), dim)).astype(np.float32)
                crops /= np.linalg.norm(crops, axis=2, keepdims=True)
            images = [NewImage(f"f{i % FOLDERS:02d}/img{i:07d}.jpg", 150_000 + i % 5000, 1_700_000_000_000_000_000 + i,
                               hashlib.sha256(i.to_bytes(8, "little")).hexdigest(), 1024, 768, "JPEG", x[j],
                               crops=None if crops is None else tuple(crop_codes.encode(code, crops[j])))
                      for j, i in enumerate(range(first, first + count))]
            for at in range(0, count, add_batch):  # `imgsim index` commits and adds one batch of 16 at a time
                t0 = time.perf_counter()
                with store.transaction():
                    ids = store.insert(images[at:at + add_batch])
                assert ids[0] == first + at + 1  # row id = position + 1
                t1 = time.perf_counter()
                graph.add(ids, x[at:at + add_batch])
                t_graph += time.perf_counter() - t1
                t_sql += t1 - t0
        t0 = time.perf_counter()
    t_save = time.perf_counter() - t0
    return {"build_s": time.perf_counter() - start, "sqlite_insert_s": t_sql, "graph_add_s": t_graph,
            "save_s": t_save}


def phase_open(path: str, n: int, dim: int, seed: int) -> dict:
    from imgsim import Index

    q = queries(n, dim, seed, 1, centres(n, dim, seed))[0]
    t0 = time.perf_counter()
    index = Index.open(path, read_only=True)
    t1 = time.perf_counter()
    index.search(q, k=10)
    t2 = time.perf_counter()
    index.close()
    return {"open_s": t1 - t0, "first_search_s": t2 - t1}


def phase_search(path: str, n: int, dim: int, seed: int, count: int, out: str) -> dict:
    from imgsim import Index
    from imgsim.filters import Filter

    qs = queries(n, dim, seed, count, centres(n, dim, seed))
    index = Index.open(path, read_only=True)
    index.search(qs[0], k=10)  # load the graph
    folder = Filter(folders=("f07",))
    found = {}
    timings = {}
    read_vectors = index.store.vector_bytes
    reads = [0]

    def counted(ids, dim):  # how many candidates' vectors a search reads (a reduced graph reads in steps)
        reads[0] += len(ids)
        return read_vectors(ids, dim)

    index.store.vector_bytes = counted
    walk = index.graph._walk
    walks = [0]

    def walked(*args):  # how many graph walks a search makes (a shallow one first, a full one if needed)
        walks[0] += 1
        return walk(*args)

    index.graph._walk = walked
    # The graph's recall is measured ranked by the query alone (expand=False); `expanded` times the
    # default search, whose query expansion re-ranks by design (its "recall" is its overlap).
    for name, f, expand in (("unfiltered", None, False), ("folder_1pct", folder, False),
                            ("unfiltered_again", None, False), ("expanded", None, True)):
        ms, cpu, ids = [], [], []
        reads[0] = walks[0] = 0
        for q in qs:
            t0, c0 = time.perf_counter(), time.process_time()
            results = index.search(q, k=10, filter=f, expand=expand)
            ms.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            ids.append([r.id for r in results] + [-1] * (10 - len(results)))
        found[name] = np.asarray(ids)
        timings[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                         "cpu_p50_ms": float(np.percentile(cpu, 50)), "vectors_read": reads[0] / len(qs),
                         "walks": walks[0] / len(qs)}
    center = index.manifest.center
    index.close()
    np.savez(out, center=np.zeros(0) if center is None else center, **found)
    return timings


def phase_truth(n: int, dim: int, seed: int, count: int, found: str) -> dict:
    """Exact float32 scan with the index's own scoring (cosine, centred around the index's mean),
    over every vector and over folder f07 only; recall@10 of what `Index.search` returned."""
    saved = np.load(found)
    center = saved["center"] if saved["center"].size else None
    c = centres(n, dim, seed)
    qs = queries(n, dim, seed, count, c)

    def prep(m: np.ndarray) -> np.ndarray:
        if center is not None:
            m = m - center
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    qp = prep(qs)
    best = {name: (np.full((count, 0), -np.inf, np.float32), np.zeros((count, 0), np.int64))
            for name in ("unfiltered", "folder_1pct")}
    t_exact = 0.0
    for first in range(0, n, CHUNK):
        x = vectors(first, min(CHUNK, n - first), n, dim, seed, c)
        t0 = time.perf_counter()
        scores = qp @ prep(x).T
        t_exact += time.perf_counter() - t0
        ids = np.arange(first, first + len(x)) + 1
        in_folder = (ids - 1) % FOLDERS == 7
        for name, keep in (("unfiltered", slice(None)), ("folder_1pct", in_folder)):
            s, i = best[name]
            s = np.concatenate([s, scores[:, keep]], axis=1)
            i = np.concatenate([i, np.broadcast_to(ids[keep], (count, len(ids[keep])))], axis=1)
            top = np.argsort(-s, axis=1)[:, :10]
            best[name] = (np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1))
    np.savez(str(found).replace(".npz", "") + "-truth.npz", **{name: ids for name, (_, ids) in best.items()})
    recall = {}
    for name in saved.files:
        if name == "center":
            continue
        truth = best["folder_1pct" if name.startswith("folder") else "unfiltered"][1]
        recall[name] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(saved[name], truth)]))
    return {"recall_at_10": recall, "exact_scan_ms_per_query": t_exact / count * 1000}


# -- the parent: runs each phase in a child and reads its peak memory -----------------------------
def timed_child(cmd: list[str], env: dict | None = None) -> tuple[str, float, float, float]:
    """Run `cmd`; return (stdout, wall seconds, its own peak RSS MB, its CPU seconds), from wait4.
    CPU time (user + system) says what the work costs when the machine is shared."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
    return out.decode(), wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def phase(name: str, *args) -> tuple[dict, float, float, float]:
    out, wall, rss, cpu = timed_child([sys.executable, str(HERE), "--phase", name, *map(str, args)])
    return json.loads(out.strip().splitlines()[-1]), wall, rss, cpu


def photo_file(workdir: Path) -> Path:
    sys.path.insert(0, str(HERE.parent))
    from sample_photos import photo

    path = workdir / "coffee.jpg"
    if not path.exists():
        photo("coffee").save(path, quality=90)
    return path


def bench(n: int, args) -> None:
    dim = args.dim
    folder = Path(args.workdir) / f"n{n}{'' if args.crop_views == 'none' else '-' + args.crop_views}"
    if folder.exists() and not args.reuse:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "idx")
    print(f"\n== {n} images, {dim}-d, model {MODEL} (load average {os.getloadavg()[0]:.1f}) ==", flush=True)
    if not (args.reuse and Path(path + ".sqlite").exists()):
        build, wall, rss, cpu = phase("build", path, n, dim, args.seed, args.ef_construction, args.add_batch)
        print(f"build: {wall:.1f} s wall, {cpu:.0f} s CPU ({n / wall:.0f} images/s; SQLite inserts "
              f"{build['sqlite_insert_s']:.1f} s, graph adds {build['graph_add_s']:.1f} s, save {build['save_s']:.1f} s), "
              f"peak memory {rss:.0f} MB", flush=True)
    faiss_bytes = sum(p.stat().st_size for p in folder.glob("idx.faiss*"))
    sqlite_bytes = Path(path + ".sqlite").stat().st_size
    print(f"disk: {(faiss_bytes + sqlite_bytes) / n:.0f} bytes/image (FAISS {faiss_bytes / 1e6:.0f} MB + SQLite "
          f"{sqlite_bytes / 1e6:.0f} MB = {(faiss_bytes + sqlite_bytes) / 1e6:.0f} MB)", flush=True)
    # The first open checks the FAISS file in full (checksum and structure) and records that in the
    # user's cache (imgsim/checked.py), which is emptied here; later opens find the record.
    shutil.rmtree(os.environ["IMGSIM_CACHE"], ignore_errors=True)
    age = time.time() - max(Path(path + ".faiss").stat().st_mtime, Path(path + ".sqlite").stat().st_mtime)
    time.sleep(max(0.0, 3.5 - age))  # a file changed in the last 3 s gets no record yet
    opens = [phase("open", path, n, dim, args.seed) for _ in range(1 if args.skip_cli else 4)]
    opens += opens[:1] * (4 - len(opens))
    first, best = opens[0], min(opens[1:], key=lambda o: o[0]["open_s"] + o[0]["first_search_s"])
    for label, o in (("first open (file checked)", first), ("later opens (best of 3)", best)):
        print(f"{label}: Index.open {o[0]['open_s'] * 1000:.0f} ms, then first search (loads the graph) "
              f"{o[0]['first_search_s'] * 1000:.0f} ms; {o[1]:.2f} s wall, {o[3]:.2f} s CPU for the whole process; "
              f"peak memory {o[2]:.0f} MB", flush=True)
    found = folder / "found.npz"
    timings, wall, rss, _ = phase("search", path, n, dim, args.seed, args.queries, found)
    truth, _, _, _ = phase("truth", n, dim, args.seed, args.queries, found)
    for name in timings:
        t = timings[name]
        cpu = f" (CPU p50 {t['cpu_p50_ms']:.2f} ms)" if "cpu_p50_ms" in t else ""
        print(f"Index.search k=10 {name:<15} p50 {t['p50_ms']:6.2f} ms  p99 {t['p99_ms']:6.2f} ms{cpu}  "
              f"recall@10 {truth['recall_at_10'][name]:.3f}  vectors read {t.get('vectors_read', 0):.0f}/search, "
              f"walks {t.get('walks', 0):.2f}/search", flush=True)
    print(f"search process peak memory {rss:.0f} MB ({args.queries} queries of each kind, load average "
          f"{os.getloadavg()[0]:.1f}); exact float32 numpy scan {truth['exact_scan_ms_per_query']:.1f} ms/query",
          flush=True)
    if args.skip_cli:
        return
    imgsim = shutil.which("imgsim") or str(Path(sys.executable).parent / "imgsim")
    photo = photo_file(Path(args.workdir))
    runs = [timed_child([imgsim, "search", str(photo), "--index", path, "-k", "10", "-q"]) for _ in range(args.cli_runs)]
    walls = sorted(r[1] for r in runs)
    cpus = sorted(r[3] for r in runs)
    print(f"cold `imgsim search photo.jpg` ({args.cli_runs} runs): median {statistics.median(walls):.2f} s wall "
          f"(min {walls[0]:.2f}, max {walls[-1]:.2f}), median {statistics.median(cpus):.2f} s CPU; "
          f"peak memory {max(r[2] for r in runs):.0f} MB", flush=True)
    if not args.keep:
        shutil.rmtree(folder)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--phase":
        name, rest = sys.argv[2], sys.argv[3:]
        if name == "build":
            result = phase_build(rest[0], *map(int, rest[1:]))
        elif name == "open":
            result = phase_open(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        elif name == "search":
            result = phase_search(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), rest[5])
        elif name == "truth":
            result = phase_truth(int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        else:
            sys.exit(f"unknown phase {name}")
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cli-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectrum", type=float, default=SPECTRUM,
                        help="0: isotropic vectors (default); 1: a real-picture-like spectrum (see SPECTRUM).")
    parser.add_argument("--ef-construction", type=int, default=0, help="HNSW efConstruction (default: imgsim's).")
    parser.add_argument("--add-batch", type=int, default=CHUNK,
                        help=f"Vectors committed and added to the graph at a time (default {CHUNK:,}; "
                             f"`imgsim index` adds 16, its --batch-size).")
    parser.add_argument("--skip-cli", action="store_true", help="Leave out the open and CLI timings.")
    parser.add_argument("--workdir", default="/tmp/imgsim-scale")
    parser.add_argument("--keep", action="store_true", help="Keep the indexes afterwards.")
    parser.add_argument("--reuse", action="store_true", help="Reuse an index kept by an earlier run.")
    parser.add_argument("--crop-views", choices=("default", "centre", "none"), default="default",
                        help="The indexes' crop views (synthetic): as `imgsim index` makes them (default), "
                             "with --centre-view (centre) or --no-centre-view (none).")
    args = parser.parse_args()
    os.environ["IMGSIM_BENCH_CROP_VIEWS"] = args.crop_views
    os.environ["IMGSIM_CACHE"] = str(Path(args.workdir) / "checked-cache")  # see the open phase
    os.environ["IMGSIM_BENCH_SPECTRUM"] = str(args.spectrum)  # the phases, each a child, make the same vectors
    import faiss

    from imgsim import __version__

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE.parent).stdout.strip()
    print(f"vectors: {'isotropic' if not args.spectrum else f'spectrum k^-{args.spectrum:g}'}"
          f", crop views: {args.crop_views}; imgsim {__version__} at {commit}, faiss {faiss.__version__}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}", flush=True)
    for n in args.n:
        bench(n, args)


if __name__ == "__main__":
    main()
