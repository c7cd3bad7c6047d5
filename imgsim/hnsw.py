"""HNSW parameters: what the manifest records about the graph. Kept apart from `ann.py`, which imports
FAISS, so that reading a manifest (`imgsim list`, `imgsim info`...) does not load FAISS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HnswParams:
    """HNSW parameters, named as in the paper (Malkov & Yashunin): `M` links per node,
    `ef_construction` candidates while building, `ef_search` candidates while searching."""

    M: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def to_dict(self) -> dict:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    @classmethod
    def from_dict(cls, data: dict) -> HnswParams:
        return cls(M=int(data["M"]), ef_construction=int(data["ef_construction"]), ef_search=int(data["ef_search"]))
