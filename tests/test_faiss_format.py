"""imgsim.faiss_format: real FAISS files validate; damaged or crafted ones are refused or are harmless."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import faiss
import numpy as np
import pytest

from imgsim.ann import AnnIndex, HnswParams
from imgsim.errors import IndexCorruptError
from imgsim.faiss_format import code_dim, layout, validate


def _make(dim: int, n: int, M: int, seed: int = 0, metric: int = faiss.METRIC_INNER_PRODUCT,
          qtype: int = faiss.ScalarQuantizer.QT_8bit) -> bytes:
    """A real index as imgsim builds it: IDMap(HNSWSQ 8-bit), non-contiguous ids, added in two batches."""
    rng = np.random.default_rng(seed)
    hnsw = faiss.IndexHNSWSQ(dim, qtype, M, metric)
    x = rng.standard_normal((max(n, 16), dim)).astype(np.float32)
    faiss.normalize_L2(x)
    hnsw.train(x)
    x = x[:n]
    index = faiss.IndexIDMap(hnsw)
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)
    for part in (slice(0, n // 2), slice(n // 2, n)):
        if len(ids[part]):
            index.add_with_ids(x[part], ids[part])
    return faiss.serialize_index(index).tobytes()


def _make_reduced(dim: int, reduce_to: int, n: int, M: int, seed: int = 0) -> bytes:
    """A real reduced graph, as imgsim builds it for large collections (projection learned from the vectors)."""
    rng = np.random.default_rng(seed)
    ann = AnnIndex.empty(dim, HnswParams(M=M, ef_construction=40), reduce_to=reduce_to)
    x = np.abs(rng.standard_normal((max(n, 2 * reduce_to), dim))).astype(np.float32)
    ann.train(x / np.linalg.norm(x, axis=1, keepdims=True))
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)
    for part in (slice(0, n // 2), slice(n // 2, n)):
        if len(ids[part]):
            ann.add(ids[part], x[part])
    return ann.to_bytes()


# -- real files ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dim,n,M",
    [(8, 0, 32), (8, 1, 32), (8, 2, 2), (16, 300, 2), (64, 1000, 4), (64, 1000, 16), (64, 1000, 32),
     (300, 500, 64), (1280, 200, 32), (2048, 20, 32)],
)
def test_real_indexes_validate(dim, n, M):
    assert validate(_make(dim, n, M), dim) == n


@pytest.mark.parametrize("dim,reduce_to,n,M", [(8, 4, 0, 4), (8, 4, 1, 4), (64, 16, 500, 8), (1280, 256, 300, 32)])
def test_reduced_graphs_validate(dim, reduce_to, n, M):
    data = _make_reduced(dim, reduce_to, n, M)
    assert validate(data, dim) == n
    assert code_dim(data, dim) == reduce_to
    assert code_dim(_make(dim, max(n, 1), M), dim) == dim


def test_reloaded_and_extended_index_validates():
    index = faiss.deserialize_index(np.frombuffer(_make(32, 400, 8), dtype=np.uint8))
    rng = np.random.default_rng(5)
    index.add_with_ids(rng.standard_normal((100, 32)).astype(np.float32), np.arange(100, dtype=np.int64) * 11 + 7)
    assert validate(faiss.serialize_index(index).tobytes(), 32) == 500


def test_imgsim_ann_index_validates():
    ann = AnnIndex.empty(48, HnswParams(M=16, ef_construction=100, ef_search=128))
    assert validate(ann.to_bytes(), 48) == 0
    rng = np.random.default_rng(2)
    ann.add(np.arange(1, 301, dtype=np.int64) * 3, rng.standard_normal((300, 48)).astype(np.float32))
    assert validate(ann.to_bytes(), 48) == 300


# -- files that are not ours -----------------------------------------------------------------------
def test_empty_and_garbage_are_refused():
    rng = np.random.default_rng(3)
    for data in (b"", b"IxMp", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), b"\0" * 1000):
        with pytest.raises(IndexCorruptError):
            validate(data, 8)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: _make(16, 50, 8), "dimensions, expected 32"),
        (lambda: _make(32, 50, 8, metric=faiss.METRIC_L2), "metric"),
        (lambda: faiss.serialize_index(faiss.IndexHNSWFlat(32, 8, faiss.METRIC_INNER_PRODUCT)).tobytes(), "IxMp"),
        (lambda: faiss.serialize_index(faiss.IndexIDMap(faiss.IndexHNSWFlat(32, 8, 0))).tobytes(), "IHNs"),
        (lambda: faiss.serialize_index(faiss.IndexIDMap(faiss.IndexFlatIP(32))).tobytes(), "IHNs"),
        # the layout imgsim wrote before format 3: float32 vectors in the graph
        (lambda: faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexHNSWFlat(32, 8, 0))).tobytes(), "IxMp"),
        (lambda: _make(32, 50, 8, qtype=faiss.ScalarQuantizer.QT_4bit), "scalar quantizer"),
        (lambda: _make(32, 50, 8, qtype=faiss.ScalarQuantizer.QT_fp16), "scalar quantizer"),
        (lambda: _make(32, 50, 8) + b"\0", "unexpected bytes"),
        (lambda: _make(32, 50, 8)[:-1], "truncated"),
    ],
)
def test_other_layouts_are_refused(make, message):
    with pytest.raises(IndexCorruptError, match=message):
        validate(make(), 32)


def test_crafted_fields_are_refused_with_a_clear_message():
    data = _make(8, 100, 4)
    fields = {name: (start, end) for name, start, end in layout(data, 8)}

    def patched(name: str, fmt: str, value, index: int = 0) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, fields[name][0] + index * struct.calcsize(fmt), value)
        return bytes(out)

    cases = [
        (patched("hnsw.neighbors", "<i", 100, 3), "neighbour id out of range"),
        (patched("hnsw.neighbors.size", "<Q", 2**39), "claims 549755813888 elements"),
        (patched("id_map.size", "<Q", 2**64 - 1), "claims"),
        (patched("hnsw header", "<q", 2**40, 1), "claims 1099511627776 vectors"),  # ntotal: bytes 8..16
        (patched("hnsw.levels", "<i", 0, 5), "level outside"),
        (patched("hnsw parameters", "<i", 100), "entry point"),
        (patched("id_map", "<q", struct.unpack_from("<q", data, fields["id_map"][0] + 8)[0]), "repeated id"),
    ]
    for bad, message in cases:
        with pytest.raises(IndexCorruptError, match=message):
            validate(bad, 8)


def test_crafted_reduced_graphs_are_refused_with_a_clear_message():
    data = _make_reduced(8, 4, 100, 4)
    fields = {name: (start, end) for name, start, end in layout(data, 8)}

    def patched(name: str, fmt: str, value, offset: int = 0) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, fields[name][0] + offset, value)
        return bytes(out)

    cases = [
        (patched("pre-transform.chain.size", "<i", 3), "3 transforms"),
        (patched("projection header", "<4s", b"PcAm"), "linear transform"),
        (patched("projection header", "<B", 0, 4), "linear transform"),
        (patched("projection.A", "<f", float("nan"), 8), "not finite"),
        (patched("projection.b", "<f", float("inf")), "not finite"),
        (patched("projection dimensions", "<i", 8, 4), "expected 8 to fewer"),  # d_out == d_in
        (patched("projection dimensions", "<B", 0, 8), "trained 0"),
        (patched("normalisation", "<f", 1.0, 4), "L2 normalisation"),
        (patched("normalisation", "<i", 5, 12), "L2 normalisation"),
        (patched("hnsw header", "<i", 8, 4), "8 dimensions, expected 4"),
    ]
    for bad, message in cases:
        with pytest.raises(IndexCorruptError, match=message):
            validate(bad, 8)


# -- fuzzing ---------------------------------------------------------------------------------------
_CHECK_SAFE = r"""
import json, sys
import faiss, numpy as np
paths, dim = sys.argv[2:], int(sys.argv[1])
rng = np.random.default_rng(0)
errors = 0
for path in paths:
    print(path, file=sys.stderr, flush=True)  # the last one printed is the one that crashed
    try:
        index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        q = rng.standard_normal((4, dim)).astype(np.float32)
        k = max(1, min(10, index.ntotal))
        index.search(q, k)
        params = faiss.SearchParametersHNSW()
        params.efSearch = 32
        index.search(q, k, params=params)
        index.add_with_ids(rng.standard_normal((3, dim)).astype(np.float32), np.arange(3, dtype=np.int64) - 10)
        index.search(q, k + 3)
    except RuntimeError:  # FAISS refusing cleanly is safe too
        errors += 1
print(json.dumps({"checked": len(paths), "faiss_errors": errors}))
"""


def _mutations(data: bytes, dim: int, n: int, rng: np.random.Generator):
    """Yield (description, mutated bytes): truncations, bad sizes and headers, bad graph fields, bit flips."""
    fields = layout(data, dim)
    codes = next((s, e) for name, s, e in fields if name == "storage.codes")

    def put(fmt: str, pos: int, value) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, pos, value)
        return bytes(out)

    for name, start, end in fields:
        for cut in {start, start + 1, (start + end) // 2, end - 1}:
            if cut < len(data):
                yield f"truncate in {name} at {cut}", data[:cut]
        yield f"drop {name}", data[:start] + data[end:]
    for cut in rng.integers(0, len(data), 200):
        yield f"truncate at {cut}", data[:cut]
    yield "trailing bytes", data + b"\0" * 8

    for name, start, end in fields:
        if name.endswith(".size"):
            (orig,) = struct.unpack_from("<Q", data, start)
            for value in {0, 1, max(orig - 1, 0), orig + 1, 2 * orig, n, n + 1, 2**31, 2**40, 2**63, 2**64 - 1}:
                yield f"{name} = {value}", put("<Q", start, value)
        elif name.endswith("header"):
            for fourcc in (b"IxM2", b"IxMp", b"IHNf", b"IHNp", b"IHNs", b"IHNc", b"IxFI", b"IxF2", b"IxSQ", b"null", b"\0" * 4):
                yield f"{name} fourcc {fourcc!r}", data[:start] + fourcc + data[start + 4 :]
            for value in (0, -1, dim - 1, dim + 1, 2**31 - 1):
                yield f"{name} d = {value}", put("<i", start + 4, value)
            for value in (-1, 0, n - 1, n + 1, 2**31, 2**40, 2**63 - 1):
                yield f"{name} ntotal = {value}", put("<q", start + 8, value)
            for value in (0, 2, 255):
                yield f"{name} is_trained = {value}", put("<B", start + 32, value)
            for value in (1, 2, 23, -1, 2**31 - 1):
                yield f"{name} metric = {value}", put("<i", start + 33, value)
        elif name == "storage.sq":  # qtype, rangestat, rangestat_arg, d, code_size
            for offset, fmt, values in ((0, "<i", (1, 2, 3, 4, 5, 6, -1, 2**31 - 1)), (4, "<i", (-1, 4, 2**31 - 1)),
                                        (8, "<f", (float("nan"), float("inf"))),
                                        (12, "<Q", (0, dim - 1, dim + 1, 2**63)),
                                        (20, "<Q", (0, 1, dim - 1, dim + 1, 2 * dim, 2**63))):
                for value in values:
                    yield f"{name}+{offset} = {value}", put(fmt, start + offset, value)
        elif name == "hnsw parameters":
            for slot, label in enumerate(("entry_point", "max_level", "efConstruction", "efSearch", "dummy")):
                (orig,) = struct.unpack_from("<i", data, start + 4 * slot)
                for value in {-(2**31), -2, -1, 0, 1, orig - 1, orig + 1, n - 1, n, 2**31 - 1, int(rng.integers(0, n))}:
                    yield f"{label} = {value}", put("<i", start + 4 * slot, value)

    def elements(name: str, fmt: str, values, count: int):
        start, end = next((s, e) for f, s, e in fields if f == name)
        size = struct.calcsize(fmt)
        for i in rng.integers(0, (end - start) // size, count):
            for value in values:
                yield f"{name}[{i}] = {value}", put(fmt, start + int(i) * size, value)

    yield from elements("storage.sq.trained", "<f", (float("nan"), float("inf"), -float("inf"), -1.0, 1e30, 0.0), 5)
    if any(name == "projection.A" for name, _, _ in fields):
        yield from elements("projection.A", "<f", (float("nan"), float("inf"), 1e30, 0.0), 5)
        yield from elements("projection.b", "<f", (float("nan"), -float("inf"), 1e30), 3)
    yield from elements("hnsw.assign_probas", "<d", (float("nan"), float("inf"), -1.0, 2.0, 0.0, 1.0, 0.5), 3)
    yield from elements("hnsw.cum_nneighbor_per_level", "<i", (-1, 0, 1, 7, 1000, 2**20, 2**31 - 1), 4)
    yield from elements("hnsw.levels", "<i", (-1, 0, 1, 2, 3, 100, 2**31 - 1), 10)
    yield from elements("hnsw.offsets", "<Q", (0, 1, 2**32, 2**63, 2**64 - 1), 10)
    in_range = [int(v) for v in rng.integers(0, n, 5)]
    yield from elements("hnsw.neighbors", "<i", (-2**31, -2, -1, n, n + 1, 2**31 - 1, *in_range), 60)
    yield from elements("id_map", "<q", (-1, -2**63, 0, 2**63 - 1, int(rng.integers(0, 2**62))), 10)

    # Graph damage that faiss 1.15's own checks let through: an entry point below the top level, and
    # upper-level links to nodes that do not reach that level (search then reads past their links).
    at = {name: start for name, start, _ in fields}
    levels = np.frombuffer(data, "<i4", n, at["hnsw.levels"])
    offsets = np.frombuffer(data, "<u8", n + 1, at["hnsw.offsets"])
    (top,) = struct.unpack_from("<i", data, at["hnsw parameters"] + 4)
    low = np.flatnonzero(levels == 1)
    for node in {int(low[0]), int(low[-1]), n - 1, *map(int, rng.choice(low, 3))}:
        yield f"entry_point = {node} (level {levels[node]})", put("<i", at["hnsw parameters"], node)
    for value in (top - 1, top + 1, top + 2):
        yield f"max_level = {value}", put("<i", at["hnsw parameters"] + 4, value)
    level1_width = struct.unpack_from("<i", data, at["hnsw.cum_nneighbor_per_level"] + 4)[0]
    for node in rng.choice(np.flatnonzero(levels > 1), 8):
        slot = int(offsets[node]) + level1_width
        for target in {n - 1, int(low[-1]), int(rng.choice(low))}:
            yield f"upper link of {node} -> {target}", put("<i", at["hnsw.neighbors"] + 4 * slot, target)

    structural = np.r_[0 : codes[0], codes[1] : len(data)]  # bytes outside the float vectors
    for k in range(1500):
        out = bytearray(data)
        count = int(rng.integers(1, 5))
        where = rng.choice(structural, count) if k % 5 else rng.integers(0, len(data), count)
        for pos in where:
            out[pos] ^= int(rng.integers(1, 256))
        yield f"flip bytes at {sorted(int(p) for p in where)}", bytes(out)


@pytest.mark.parametrize("reduced", [False, True], ids=["full", "reduced"])
def test_fuzzed_files_are_refused_or_harmless(tmp_path, reduced):
    dim, n = 8, 200
    data = _make_reduced(dim, 4, n, 4, seed=7) if reduced else _make(dim, n, 4, seed=7)
    rng = np.random.default_rng(1234)
    accepted, refused = [], 0
    for description, mutated in _mutations(data, dim, n, rng):
        try:
            validate(mutated, dim)
        except IndexCorruptError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        if mutated != data:
            accepted.append((description, mutated))
    described = {}
    for i, (description, mutated) in enumerate(accepted):
        path = tmp_path / f"{i}.faiss"
        path.write_bytes(mutated)
        described[str(path)] = description
    proc = subprocess.run(  # one process for all: a segfault fails this test instead of killing pytest
        [sys.executable, "-c", _CHECK_SAFE, str(dim), *described],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, f"FAISS died (rc {proc.returncode}) on accepted file: {described.get(last, proc.stderr[-2000:])}"
    report = json.loads(proc.stdout)
    print(f"fuzz: {refused + len(accepted)} mutations, {refused} refused, {len(accepted)} accepted and safe ({report})")
    assert refused > 1000 and report["checked"] == len(accepted)
