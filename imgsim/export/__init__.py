"""Handing an index to other engines without re-embedding: Parquet files (`imgsim.export.parquet`,
extra `imgsim[export]`) and Qdrant collections kept in sync (`imgsim.export.qdrant`, extra
`imgsim[qdrant]`). `imgsim.export.source` reads an index generically and needs neither extra; the
core never imports this package."""

from __future__ import annotations

from ..errors import ImgsimError


def require(module: str, extra: str, package: str):
    """Import an optional dependency, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImgsimError(f"{package} is not installed: pip install 'imgsim[{extra}]'") from None


def query_vector(index, image):
    """The vector to query an exported copy of `index` with (see `imgsim.export.state.query_vector`)."""
    from .state import query_vector as _query_vector

    return _query_vector(index, image)
