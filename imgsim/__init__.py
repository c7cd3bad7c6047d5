"""imgsim: offline image similarity search. ONNX embeddings, a FAISS HNSW file, SQLite metadata.

    from imgsim import Index
    with Index.create("photos") as index:  # the default model, efficientnet-lite0-lw
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

_FROM_INDEX = frozenset({"Index", "QueryOutcome", "SearchResult", "SyncReport"})


def __getattr__(name: str):
    """`Index` and its result types load on first use (numpy, Pillow, SQLite): `import imgsim.cli`
    alone, for `imgsim --help`, stays light."""
    if name in _FROM_INDEX:
        from . import index

        value = getattr(index, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_INDEX)


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
