"""HNSW parameters: what the manifest records about the graph. Kept apart from `ann.py`, which imports
FAISS, so that reading a manifest (`imgsim list`, `imgsim info`...) does not load FAISS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HnswParams:
    """HNSW parameters, named as in the paper (Malkov & Yashunin): `M` links per node,
    `ef_construction` candidates while building, `ef_search` candidates while searching."""

    M: int = 32
    ef_construction: int = 320
    """320: at a million images of real-picture-like vectors, the reduced graph built at 160 held the
    true top 10 among a search's 64 candidates for 0.970-0.972 of queries, at 240 for 0.977, at 320
    for 0.995 on a 16-core machine and 0.982 built here on 2 cores (isotropic vectors: 1.000), with
    36 level-0 links a node instead of 28; the graph takes ~2x as long to build as at 160, far less
    than embedding the pictures (scripts/bench_scale.py --spectrum 1, README "At 100,000 and
    1,000,000 images"). `imgsim rebuild` raises an index's lower value to this."""
    ef_search: int = 64

    def to_dict(self) -> dict:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    @classmethod
    def from_dict(cls, data: dict) -> HnswParams:
        return cls(M=int(data["M"]), ef_construction=int(data["ef_construction"]), ef_search=int(data["ef_search"]))
