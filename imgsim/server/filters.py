"""The one place where a request's filter parameters become keyword arguments of `Index.search`.

`/search`, `/similar/{id}` and `/dupes` take the same filters as `imgsim search` and `imgsim dupes`:
they become one `imgsim.Filter` (whose values reach SQL only as bound parameters) plus `min_score`.
A value the filter refuses (a date that is not a date) is a 400 with the filter's own message.
"""

from __future__ import annotations

from fastapi import Query

from ..errors import ImgsimError
from ..filters import Filter
from .errors import ApiError

FILTERS = ("folder", "label", "format", "min_width", "min_height", "since", "until", "min_score")


def supported_filters() -> list[str]:
    return list(FILTERS)


def search_filters(
    folder: list[str] | None = Query(None, description="Only images under this folder (relative to the root); repeatable."),
    label: list[str] | None = Query(None, description="Only images with this label; repeatable."),
    format: list[str] | None = Query(None, description="Only images of this format (jpeg, png, ...); repeatable."),
    min_width: int | None = Query(None, ge=0, description="Only images at least this wide, in pixels."),
    min_height: int | None = Query(None, ge=0, description="Only images at least this tall, in pixels."),
    since: str | None = Query(None, description="Only images taken (EXIF, else file time) on or after this date "
                                                "(2024, 2024-06, 2024-06-30, 2024-06-30T18:00)."),
    until: str | None = Query(None, description="Only images taken on or before this date."),
    min_score: float | None = Query(None, ge=-1, le=1, description="Drop results scoring below this."),
) -> dict:
    """Keyword arguments for `Index.search` (a FastAPI dependency, so /docs lists every filter)."""
    try:
        flt = Filter(folders=tuple(folder or ()), labels=tuple(label or ()), formats=tuple(format or ()),
                     min_width=min_width, min_height=min_height, since=since or None, until=until or None)
    except ImgsimError as e:
        raise ApiError(400, str(e)) from None
    kwargs: dict = {"filter": None if flt.empty else flt}
    if min_score is not None:
        kwargs["min_score"] = min_score
    return kwargs
