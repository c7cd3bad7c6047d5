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
    for 0.995 (isotropic vectors: 1.000), its level-0 links 36 a node instead of 28 (graph adds ~2x
    as long as at 160; embedding the pictures costs far more; scripts/bench_scale.py --spectrum 1,
    README "At 100,000 and 1,000,000 images")."""
    ef_search: int = 64

    def to_dict(self) -> dict:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    @classmethod
    def from_dict(cls, data: dict) -> HnswParams:
        return cls(M=int(data["M"]), ef_construction=int(data["ef_construction"]), ef_search=int(data["ef_search"]))
