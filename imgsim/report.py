"""Self-contained HTML pages of results: each query beside its results, or each duplicate group with
its keeper marked. Thumbnails are embedded as small JPEG data URIs, so the page is one file that
opens anywhere (no server, no network) and can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from . import images as imgs
from .errors import ImageError, ImgsimError
from .files import atomic_write

THUMB_SIDE = 192
"""Longest side of an embedded thumbnail, in pixels."""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 1.5em 0 .5em; word-break: break-all; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; width: 200px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 4px; }
figure.query { border: 2px solid #36c; } figure.keeper { border: 2px solid #2a2; }
figure img { display: block; max-width: 192px; max-height: 192px; margin: 0 auto; }
figcaption { font-size: 12px; word-break: break-all; margin-top: 4px; }
.score { font-weight: 600; } .missing { width: 192px; height: 120px; display: flex; align-items: center;
  justify-content: center; background: #eee; color: #888; }
"""


def thumbnail_uri(path: str | os.PathLike) -> str | None:
    """A small JPEG of an image file as a data: URI, or None if it cannot be read (decoded with the
    same limits as indexing: an untrusted file gets no more than a thumbnail's worth of trust)."""
    try:
        decoded = imgs.decode(path, min_side=THUMB_SIDE)
    except ImageError:
        return None
    image = decoded.image
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _figure(path: str, caption: str, css: str = "") -> str:
    uri = thumbnail_uri(path)
    picture = (f'<img src="{uri}" alt="{html.escape(os.path.basename(path))}">' if uri
               else '<div class="missing">not readable</div>')
    return (f'<figure class="{css}">{picture}<figcaption>{caption}'
            f'<br>{html.escape(_text(path))}</figcaption></figure>')


def _text(path) -> str:
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(body)}</body></html>\n")


def _write(file: str | os.PathLike, text: str) -> None:
    path = Path(os.path.expanduser(os.fspath(file)))
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as e:
        raise ImgsimError(f"cannot write {file}: {e.strerror or e}") from None


def search_page(file: str | os.PathLike, index, pages: list[tuple[str, list]]) -> None:
    """Write a page with each query (a file, or an indexed image's stored path) and its results."""
    body = []
    for query, results in pages:
        query_file = query if os.path.exists(query) else str(index.resolve(query))
        figures = [_figure(query_file, "query", "query")]
        figures += [_figure(r.abspath, f'#{r.rank} <span class="score">{r.score:.3f}</span>') for r in results]
        body.append(f"<h2>{html.escape(_text(query))}</h2><div class=\"row\">{''.join(figures)}</div>")
    _write(file, _page(f"imgsim: {len(pages)} {'query' if len(pages) == 1 else 'queries'}", body))


def dupes_page(file: str | os.PathLike, index, groups: list) -> None:
    """Write a page with each duplicate group, keeper first and marked, every member's score."""
    body = []
    for number, group in enumerate(groups, 1):
        figures = []
        for member, score, same in zip(group.members, group.scores, group.identical):
            keeper = member is group.keeper
            label = "keep" if keeper else ("identical" if same else f"{score:.3f}")
            size = f"{member['width']}x{member['height']}, {member['size'] / 1e3:.0f} KB"
            figures.append(_figure(member["abspath"], f'<span class="score">{label}</span> {size}',
                                   "keeper" if keeper else ""))
        body.append(f"<h2>Group {number}: {len(group.members)} images</h2><div class=\"row\">{''.join(figures)}</div>")
    duplicates = sum(len(g.members) - 1 for g in groups)
    _write(file, _page(f"imgsim: {len(groups)} duplicate groups, {duplicates} duplicates", body))
