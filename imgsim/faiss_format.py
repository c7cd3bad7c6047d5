"""A pure-Python check of a serialized FAISS index before FAISS itself is allowed to read it.

FAISS trusts its input: a malformed file can make `faiss.deserialize_index` allocate terabytes, or
leave a graph whose neighbour ids point outside the arrays, so that a later search reads out of
bounds and the process dies. `validate` parses the whole file with `struct` and `numpy` (no FAISS
call) and raises `IndexCorruptError` unless every structure FAISS relies on is consistent.

Only the two layouts imgsim writes are accepted: an `IndexIDMap` around an `IndexHNSWSQ` (8-bit
scalar quantizer, `QT_8bit`) with inner-product metric, and the reduced graph of large collections,
where an `IndexPreTransform` (a `LinearTransform` with bias, then a `NormalizationTransform`) sits
between the two, as written by `faiss.serialize_index` (checked against the bytes faiss 1.15.1 writes). The layout, from faiss/impl/index_read.cpp (`read_index`,
`read_index_header`, `read_HNSW`, `read_ScalarQuantizer`) and faiss/impl/io_macros.h (`READVECTOR`),
all little-endian:

    header  = fourcc:4s  d:i32  ntotal:i64  dummy:i64  dummy:i64  is_trained:u8  metric:i32
              (metric_arg:f32 follows only when metric > 1, never for inner product)
    vector  = size:u64  then size elements
    file    = header("IxMp")  [reduced]  header("IHNs")  hnsw  header("IxSQ")  sq  codes:vector<u8>  id_map:vector<i64>
    reduced = header("IxPT")  nt:i32 (2)
              "LTra"  have_bias:u8 (1)  A:vector<f32> (r*d)  b:vector<f32> (r)  d_in:i32 (d)  d_out:i32 (r)  is_trained:u8
              "VNrm"  norm:f32 (2)  d_in:i32 (r)  d_out:i32 (r)  is_trained:u8
              (the graph, its quantizer and codes then have r dimensions, 0 < r < d)
    hnsw    = assign_probas:vector<f64>  cum_nneighbor_per_level:vector<i32>  levels:vector<i32>
              offsets:vector<u64>  neighbors:vector<i32>
              entry_point:i32  max_level:i32  efConstruction:i32  efSearch:i32  dummy:i32
    sq      = qtype:i32 (0, QT_8bit)  rangestat:i32  rangestat_arg:f32  d:u64  code_size:u64 (= d)
              trained:vector<f32> (2*d: each dimension's low end, then its width)
    codes   = ntotal*d bytes, one per dimension

The FAISS file imgsim wrote before format 3 (`IndexIDMap2` around `IndexHNSWFlat`: "IxM2", "IHNf",
"IxFI") is refused like any other layout; opening such an index for writing migrates it and rebuilds its graph.
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import IndexCorruptError

METRIC_INNER_PRODUCT = 0
MAX_VECTORS = 2**31 - 1  # HNSW neighbour ids are int32
MAX_LEVELS = 64  # faiss makes ~30 levels for M=2 and fewer for larger M
MAX_LINKS = 2**16  # per node, all levels together
MAX_EF = 2**20
_HEADER = struct.Struct("<4siqqqBi")
_HNSW_TAIL = struct.Struct("<iiiii")
_SQ = struct.Struct("<iifQQ")
QT_8BIT = 0


def validate(data: bytes, dim: int) -> int:
    """Return the number of vectors in `data`, or raise `IndexCorruptError` saying what is wrong."""
    return _parse(data, dim)[0]


def code_dim(data: bytes, dim: int) -> int:
    """Validate `data`; return the dimension its graph compares (`dim`, or less for a reduced graph)."""
    return _parse(data, dim)[2]


def layout(data: bytes, dim: int) -> list[tuple[str, int, int]]:
    """Validate `data`; return (field name, start byte, end byte) for every field, in file order."""
    return _parse(data, dim)[1]


def _parse(data: bytes, dim: int) -> tuple[int, list[tuple[str, int, int]], int]:
    r = _Reader(data)
    ntotal = _index_header(r, "id map", b"IxMp", dim)
    graph_dim = dim
    if data[r.pos:r.pos + 4] == b"IxPT":
        if _index_header(r, "pre-transform", b"IxPT", dim) != ntotal:
            raise IndexCorruptError("FAISS file is inconsistent: the id map and its pre-transform differ in size")
        graph_dim = _projection(r, dim)
    if _index_header(r, "hnsw", b"IHNs", graph_dim) != ntotal:
        raise IndexCorruptError("FAISS file is inconsistent: the id map and the HNSW graph differ in size")
    _hnsw(r, ntotal)
    if _index_header(r, "storage", b"IxSQ", graph_dim) != ntotal:
        raise IndexCorruptError("FAISS file is inconsistent: the HNSW graph and its vectors differ in size")
    _sq_codes(r, ntotal, graph_dim)
    _id_map(r, ntotal)
    if r.pos != len(r.data):
        raise IndexCorruptError(f"FAISS file has {len(r.data) - r.pos} unexpected bytes after byte {r.pos}")
    return ntotal, r.fields, graph_dim


class _Reader:
    """Reads fields in order, refusing to read (or allocate) past the end of the data."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.fields: list[tuple[str, int, int]] = []
        self.trained_flags: list[int] = []

    def _advance(self, what: str, nbytes: int) -> int:
        start = self.pos
        if nbytes > len(self.data) - start:
            raise IndexCorruptError(f"FAISS file is truncated at byte {len(self.data)} ({what} starts at byte {start})")
        self.pos += nbytes
        self.fields.append((what, start, self.pos))
        return start

    def unpack(self, what: str, fmt: struct.Struct) -> tuple:
        return fmt.unpack_from(self.data, self._advance(what, fmt.size))

    def vector(self, what: str, dtype: str, unit: int = 1) -> np.ndarray:
        """A FAISS vector: u64 size, then size*unit elements of `dtype`."""
        (size,) = self.unpack(f"{what}.size", struct.Struct("<Q"))
        count = size * unit
        itemsize = np.dtype(dtype).itemsize
        if size >= 2**40 or count * itemsize > len(self.data) - self.pos:
            raise IndexCorruptError(
                f"FAISS file is truncated or corrupt: {what} at byte {self.pos - 8} claims {size} elements, "
                f"only {len(self.data) - self.pos} bytes remain"
            )
        start = self._advance(what, count * itemsize)
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=start)


def _index_header(r: _Reader, what: str, fourcc: bytes, dim: int) -> int:
    """An index header; return its ntotal."""
    got, d, ntotal, _, _, is_trained, metric = r.unpack(f"{what} header", _HEADER)
    if got != fourcc:
        raise IndexCorruptError(f"FAISS file has {got!r} where {fourcc!r} ({what}) was expected: not an imgsim index")
    if d != dim:
        raise IndexCorruptError(f"FAISS {what} has {d} dimensions, expected {dim}")
    if metric != METRIC_INNER_PRODUCT:
        raise IndexCorruptError(f"FAISS {what} uses metric {metric}, expected inner product ({METRIC_INNER_PRODUCT})")
    if is_trained not in (0, 1) or (is_trained == 0 and ntotal != 0):
        raise IndexCorruptError(f"FAISS {what} is marked untrained ({is_trained}) but holds vectors")
    r.trained_flags.append(is_trained)
    if not 0 <= ntotal <= MAX_VECTORS:
        raise IndexCorruptError(f"FAISS {what} claims {ntotal} vectors")
    return ntotal


_I32 = struct.Struct("<i")
_LTRA_TAIL = struct.Struct("<iiB")
_VNRM = struct.Struct("<4sfiiB")


def _projection(r: _Reader, dim: int) -> int:
    """A reduced graph's transforms: centre-and-project (finite, trained), then normalise; return
    the projected dimension."""
    (nt,) = r.unpack("pre-transform.chain.size", _I32)
    if nt != 2:
        raise IndexCorruptError(f"FAISS pre-transform has {nt} transforms, expected 2")
    fourcc, have_bias = r.unpack("projection header", struct.Struct("<4sB"))
    if fourcc != b"LTra" or have_bias != 1:
        raise IndexCorruptError(f"FAISS pre-transform starts with {fourcc!r} (bias {have_bias}), expected a "
                                f"linear transform with bias")
    a = r.vector("projection.A", "<f4")
    b = r.vector("projection.b", "<f4")
    d_in, d_out, trained = r.unpack("projection dimensions", _LTRA_TAIL)
    if d_in != dim or not 0 < d_out < dim or len(a) != d_in * d_out or len(b) != d_out or trained != 1:
        raise IndexCorruptError(f"FAISS projection maps {d_in} to {d_out} dimensions with {len(a)} + {len(b)} "
                                f"values (trained {trained}), expected {dim} to fewer, trained")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise IndexCorruptError("FAISS projection has values that are not finite")
    fourcc, norm, n_in, n_out, trained = r.unpack("normalisation", _VNRM)
    if fourcc != b"VNrm" or norm != 2.0 or n_in != d_out or n_out != d_out or trained != 1:
        raise IndexCorruptError(f"FAISS pre-transform ends with {fourcc!r} ({norm}, {n_in} to {n_out}), expected "
                                f"an L2 normalisation of {d_out} dimensions")
    return d_out


def _hnsw(r: _Reader, ntotal: int) -> None:
    """The HNSW graph; see faiss/impl/HNSW.h for what each array means."""
    probas = r.vector("hnsw.assign_probas", "<f8")
    cum = r.vector("hnsw.cum_nneighbor_per_level", "<i4").astype(np.int64)
    levels = r.vector("hnsw.levels", "<i4").astype(np.int64)
    offsets = r.vector("hnsw.offsets", "<u8")
    neighbors = r.vector("hnsw.neighbors", "<i4")
    entry_point, max_level, ef_construction, ef_search, _ = r.unpack("hnsw parameters", _HNSW_TAIL)

    if not 1 <= len(probas) <= MAX_LEVELS or not np.all((probas >= 0) & (probas <= 1)):
        raise IndexCorruptError(f"FAISS HNSW has {len(probas)} level probabilities, or one outside [0, 1]")
    if len(cum) != len(probas) + 1 or cum[0] != 0 or np.any(np.diff(cum) < 0) or cum[-1] > MAX_LINKS:
        raise IndexCorruptError("FAISS HNSW neighbour counts per level are not a valid cumulative table")
    if len(levels) != ntotal or len(offsets) != ntotal + 1:
        raise IndexCorruptError(f"FAISS HNSW has {len(levels)} levels and {len(offsets)} offsets for {ntotal} vectors")
    if ntotal and (levels.min() < 1 or levels.max() > len(cum) - 1):
        raise IndexCorruptError(f"FAISS HNSW has a node level outside [1, {len(cum) - 1}]")
    if offsets[0] != 0 or np.any(np.diff(offsets) != cum[levels].astype(np.uint64)):
        raise IndexCorruptError("FAISS HNSW neighbour offsets do not match the node levels")
    if len(neighbors) != int(offsets[-1]):
        raise IndexCorruptError(f"FAISS HNSW has {len(neighbors)} neighbour slots, offsets say {int(offsets[-1])}")
    if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= ntotal):
        raise IndexCorruptError(f"FAISS HNSW neighbour id out of range [-1, {ntotal})")
    _check_upper_links(levels, offsets, cum, neighbors)

    if ntotal == 0:
        if entry_point != -1 or max_level != -1:
            raise IndexCorruptError("FAISS HNSW is empty but has an entry point")
    elif not 0 <= entry_point < ntotal or max_level != levels.max() - 1 or levels[entry_point] != max_level + 1:
        raise IndexCorruptError(f"FAISS HNSW entry point {entry_point} or top level {max_level} is inconsistent")
    if not (1 <= ef_construction <= MAX_EF and 1 <= ef_search <= MAX_EF):
        raise IndexCorruptError(f"FAISS HNSW has efConstruction {ef_construction}, efSearch {ef_search}")


def _check_upper_links(levels: np.ndarray, offsets: np.ndarray, cum: np.ndarray, neighbors: np.ndarray) -> None:
    """A link on level l >= 1 must point to a node that exists on level l (search walks it there)."""
    nodes = np.flatnonzero(levels > 1)
    counts = cum[levels[nodes]] - cum[1]
    if not counts.sum():
        return
    owner = np.repeat(nodes, counts)
    pos = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + cum[1]
    layer = np.searchsorted(cum, pos, side="right") - 1
    target = neighbors[offsets[owner].astype(np.int64) + pos]
    if np.any((target >= 0) & (levels[np.maximum(target, 0)] <= layer)):
        raise IndexCorruptError("FAISS HNSW links a node on a level the node does not reach")


def _sq_codes(r: _Reader, ntotal: int, dim: int) -> None:
    """The scalar quantizer (8 bits per dimension, finite ranges) and its codes, one byte per dimension."""
    qtype, rangestat, rangestat_arg, d, code_size = r.unpack("storage.sq", _SQ)
    if qtype != QT_8BIT or d != dim or code_size != dim:
        raise IndexCorruptError(f"FAISS scalar quantizer is type {qtype} with {d} dimensions and {code_size}-byte "
                                f"codes, expected type {QT_8BIT} (8-bit) with {dim} and {dim}")
    if not 0 <= rangestat <= 3 or not np.isfinite(rangestat_arg):
        raise IndexCorruptError(f"FAISS scalar quantizer has range statistic {rangestat} ({rangestat_arg})")
    trained = r.vector("storage.sq.trained", "<f4")
    # A new, empty graph learns its ranges from its first vectors: untrained means no ranges, everywhere.
    untrained = ntotal == 0 and len(trained) == 0
    if set(r.trained_flags) != {0 if untrained else 1}:
        raise IndexCorruptError(f"FAISS file says trained {r.trained_flags} with {len(trained)} quantizer ranges")
    if not untrained and (len(trained) != 2 * dim or not np.isfinite(trained).all() or np.any(trained[dim:] < 0)):
        raise IndexCorruptError(f"FAISS scalar quantizer has {len(trained)} range values, not {2 * dim} finite "
                                f"ones with non-negative widths")
    (size,) = r.unpack("storage.codes.size", struct.Struct("<Q"))
    if size != ntotal * dim:
        raise IndexCorruptError(f"FAISS storage has {size} code bytes for {ntotal} vectors of {dim} dimensions")
    r._advance("storage.codes", size)


def _id_map(r: _Reader, ntotal: int) -> None:
    """The row id of each vector: ntotal distinct, non-negative int64s (-1 means "no result")."""
    ids = r.vector("id_map", "<i8")
    if len(ids) != ntotal:
        raise IndexCorruptError(f"FAISS id map has {len(ids)} ids for {ntotal} vectors")
    ordered = np.sort(ids)  # (not np.unique, which imports numpy.ma: ~20 ms of a cold command)
    if ntotal and (ordered[0] < 0 or (ordered[1:] == ordered[:-1]).any()):
        raise IndexCorruptError("FAISS id map has a negative or repeated id")
