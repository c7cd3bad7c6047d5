"""The one place where a request's filter parameters become keyword arguments of `Index.search`.

`/search` and `/similar/{id}` take the same filters as `imgsim search`. `SEARCH_KEYWORDS` maps each
query parameter to the `Index.search` keyword it becomes; a parameter mapped to None is not
supported by this imgsim's `Index.search` yet, and a request that uses it is answered 501 rather
than silently unfiltered. `/info` lists the supported ones, and the web page shows only those.
"""

from __future__ import annotations

from fastapi import Query

from .errors import ApiError

SEARCH_KEYWORDS: dict[str, str | None] = {
    "folder": None,
    "label": None,
    "format": None,
    "min_width": None,
    "min_height": None,
    "since": None,
    "until": None,
    "min_score": None,
}


def supported_filters() -> list[str]:
    return [name for name, keyword in SEARCH_KEYWORDS.items() if keyword]


def search_filters(
    folder: list[str] | None = Query(None, description="Only images under this folder (relative to the root); repeatable."),
    label: list[str] | None = Query(None, description="Only images with this label; repeatable."),
    format: list[str] | None = Query(None, description="Only images of this format (jpeg, png, ...); repeatable."),
    min_width: int | None = Query(None, ge=1, description="Only images at least this wide, in pixels."),
    min_height: int | None = Query(None, ge=1, description="Only images at least this tall, in pixels."),
    since: str | None = Query(None, description="Only images taken (else modified) on or after this date (YYYY-MM-DD)."),
    until: str | None = Query(None, description="Only images taken (else modified) on or before this date (YYYY-MM-DD)."),
    min_score: float | None = Query(None, ge=-1, le=1, description="Drop results scoring below this."),
) -> dict:
    """Keyword arguments for `Index.search` (a FastAPI dependency, so /docs lists every filter)."""
    given = {"folder": folder, "label": label, "format": format, "min_width": min_width, "min_height": min_height,
             "since": since, "until": until, "min_score": min_score}
    given = {name: value for name, value in given.items() if value not in (None, [])}
    unsupported = [name for name in given if SEARCH_KEYWORDS[name] is None]
    if unsupported:
        raise ApiError(501, f"this imgsim cannot filter searches yet ({', '.join(unsupported)}): "
                            f"search without filters, or upgrade imgsim")
    return {SEARCH_KEYWORDS[name]: value for name, value in given.items()}
