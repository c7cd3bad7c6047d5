"""imgsim: offline image similarity search. ONNX embeddings, a FAISS HNSW file, SQLite metadata.

    from imgsim import Index
    with Index.create("photos", model="efficientnet-lite0") as index:
        index.add("~/Pictures")
        for result in index.search("query.jpg", k=5):
            print(result.score, result.path)
"""

from .errors import (
    ImageError,
    ImgsimError,
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    ModelError,
    ReadOnlyIndexError,
)
from .filters import Filter
from .index import Index, QueryOutcome, SearchResult, SyncReport

__all__ = [
    "Filter",
    "ImageError",
    "ImgsimError",
    "Index",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexNotFoundError",
    "ModelError",
    "QueryOutcome",
    "ReadOnlyIndexError",
    "SearchResult",
    "SyncReport",
]
__version__ = "0.1.0"
