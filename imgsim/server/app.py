"""The FastAPI application: the HTTP API over one shared `Index`, and the web page at `/`."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import anyio
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .. import images as imgs
from ..errors import ImgsimError
from ..defaults import THRESHOLDS_SAID
from ..index import SearchResult
from ..models import available_cpus
from .errors import ApiError, JsonResponse, install_error_handlers
from .files import Thumbnails, open_indexed, stream
from .filters import search_filters, supported_filters
from .schema import SearchAnswer, errors
from .security import AccessControl, is_loopback
from .state import SharedIndex
from .uploads import UPLOAD_FIELD, decode_upload, image_from_body, read_body

log = logging.getLogger("imgsim.server")

STATIC = Path(__file__).with_name("static")
DEFAULT_K = 5
MAX_K = 1000
MAX_ID = 2**63 - 1
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServeSettings:
    """What `imgsim serve` was started with. `check()` refuses unsafe combinations."""

    index: str
    root: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    cors: tuple[str, ...] = ()
    max_upload_bytes: int = 20_000_000
    max_pixels: int = imgs.DEFAULT_MAX_PIXELS
    timeout: float = 30.0
    poll_seconds: float = 1.0
    workers: int = field(default_factory=available_cpus)
    max_connections: int = 64

    def check(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ImgsimError(f"--host {self.host} would let other machines search this index: give --token "
                              f"(or set $IMGSIM_TOKEN), or keep the default --host 127.0.0.1")
        if "*" in self.cors and not self.token:
            raise ImgsimError("--cors '*' lets any web page read this index: give --token too, or name the origin")
        if self.token is not None and len(self.token) < 8:
            raise ImgsimError("--token must be at least 8 characters")


class Api:
    """The shared state the routes use: the index, the worker limits and the thumbnail cache."""

    def __init__(self, settings: ServeSettings, shared: SharedIndex):
        self.settings = settings
        self.shared = shared
        self.search_slots = anyio.CapacityLimiter(settings.workers)
        self.thumb_slots = anyio.CapacityLimiter(settings.workers)
        self.thumbs = Thumbnails(max_pixels=settings.max_pixels)
        self.started = time.time()
        self._dupes: dict = {}

    async def run(self, limiter: anyio.CapacityLimiter, fn, *args):
        """Run blocking work in a thread, at most `workers` at a time; 503 if no slot frees up within the timeout."""
        try:
            with anyio.fail_after(self.settings.timeout):
                return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)
        except TimeoutError:
            raise ApiError(503, "the server is busy: try again shortly", {"Retry-After": "1"}) from None

    # -- the blocking parts, run in worker threads --------------------------------------------------
    def search_upload(self, upload, k: int, filters: dict) -> dict:
        with self.shared.use() as gen:
            decoded = decode_upload(upload, imgs.index_decode_size(gen.model.preprocess), self.settings.max_pixels)
            vectors = gen.model.embed(imgs.query_arrays(decoded.image, gen.model.preprocess))  # as Index.search
            with gen.lock:
                results = gen.index.search(vectors, k=k, **filters)
                note = None if results else gen.index.why_empty(filters.get("filter"), filters.get("min_score"))
            query = {"filename": upload.filename, "width": decoded.width, "height": decoded.height,
                     "format": decoded.format}
            return {"results": [result_json(r, upload.filename) for r in results], "query": query,
                    **({"note": note} if note else {})}

    def similar(self, image_id: int, k: int, filters: dict) -> dict:
        with self.shared.use() as gen, gen.lock:
            row = gen.index.image(image_id)
            if row is None:
                raise ApiError(404, f"no image {image_id} in the index")
            results = [result_json(r, row.path) for r in gen.index.similar(image_id, k=k, **filters)]  # as the CLI's
            note = None if results else gen.index.why_empty(filters.get("filter"), filters.get("min_score"))
        return {"results": results, "query": {"id": image_id, **row_json(row)}, **({"note": note} if note else {})}

    def dupes(self, threshold: float | None, filters: dict) -> dict:
        """The groups of `imgsim dupes`, computed once per index generation and set of parameters."""
        with self.shared.use() as gen:
            key = (gen.number, threshold, repr(filters))
            cached = self._dupes.get(key)
            if cached is None:
                with gen.lock:
                    groups = gen.index.duplicates(threshold=threshold, filter=filters.get("filter"))
                used = gen.index.dupes_threshold if threshold is None else threshold
                cached = {"groups": [group_json(g) for g in groups], "threshold": used}
                self._dupes = {key: cached}  # one answer kept: the index may change, memory stays small
            return cached

    def locate(self, image_id: int) -> tuple[os.PathLike, str]:
        """The file an indexed image is in now, and its stored path."""
        with self.shared.use() as gen, gen.lock:
            row = gen.index.image(image_id)
            if row is None:
                raise ApiError(404, f"no image {image_id} in the index")
            return gen.index.resolve(row.path), row.path

    def info(self) -> dict:
        with self.shared.use() as gen, gen.lock:
            data = gen.index.info()
            generation, loaded_at = gen.number, gen.loaded_at
        data["server"] = {
            "version": __version__,
            "generation": generation,
            "loaded_at": loaded_at,
            "reloads": self.shared.reloads,
            "started": self.started,
        }
        data["features"] = {"filters": supported_filters(), "dupes": True}
        data["limits"] = {"max_upload_bytes": self.settings.max_upload_bytes, "max_pixels": self.settings.max_pixels,
                          "max_k": MAX_K, "upload_field": UPLOAD_FIELD}
        return data


def result_json(r: SearchResult, query: str | None) -> dict:
    """Every field of `imgsim search --json` but `abspath` (the server's folders are its own business),
    plus the tutorial's names and the URLs of the picture."""
    data = r.to_dict()
    del data["abspath"]
    data["query"] = query
    data.update(image_id=r.id, image_path=r.path, similarity=r.score,
                image_url=f"/images/{r.id}", thumb_url=f"/thumbs/{r.id}")
    return data


def group_json(group) -> dict:
    """A duplicate group as the page reads it: the keeper's id, and members shaped like /search results."""
    members = []
    for member, score, same in zip(group.members, group.scores, group.identical):
        members.append({**{k: member[k] for k in ("id", "path", "width", "height", "format", "size")},
                        "score": round(score, 6), "identical": same, "image_id": member["id"],
                        "image_path": member["path"], "similarity": round(score, 6),
                        "image_url": f"/images/{member['id']}", "thumb_url": f"/thumbs/{member['id']}"})
    return {"keeper": group.keeper["id"], "members": members}


def row_json(row) -> dict:
    return {"path": row.path, "width": row.width, "height": row.height, "format": row.format, "size": row.size,
            "image_url": f"/images/{row.id}", "thumb_url": f"/thumbs/{row.id}"}


def result_count(limit: int | None, k: int | None) -> int:
    return limit if limit is not None else k if k is not None else DEFAULT_K


LIMIT = Query(None, ge=1, le=MAX_K, description=f"How many results (default {DEFAULT_K}).")
K = Query(None, ge=1, le=MAX_K, description="The same as `limit` (imgsim's name for it).")
IMAGE_ID = PathParam(..., ge=1, le=MAX_ID, description="An image id, as in a result's `id`.")
EXPAND = Query(True, description="Rank the results for the query together with its best match, which stays "
                                 "first (false: by the query alone, as `imgsim search --no-expand`). Scores are "
                                 "the query's own similarity either way.")


def create_app(settings: ServeSettings, shared: SharedIndex | None = None) -> FastAPI:
    """The application. The index is opened now (so that a bad index fails before the server starts
    listening) unless `shared` is given; the watcher that follows `imgsim index` runs while the app does."""
    settings.check()
    shared = shared or SharedIndex(settings.index, root=settings.root, poll_seconds=settings.poll_seconds)
    api = Api(settings, shared)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        shared.start_watching()
        try:
            yield
        finally:
            shared.close()

    app = FastAPI(title="imgsim", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=JsonResponse,
                  description="Search an imgsim index over HTTP: upload an image, get the most similar indexed "
                              "images. The web page is at `/`.")
    app.state.api = api
    install_error_handlers(app)
    app.add_middleware(AccessControl, token=settings.token, cross_origin=bool(settings.cors))
    if settings.cors:
        # Outermost, so that a browser's preflight (which never carries the token) is answered here.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)

    @app.post("/search", summary="The indexed images most similar to an uploaded one", response_model=None,
              responses={200: {"model": SearchAnswer}, **errors(400, 401, 403, 408, 413, 415, 422, 501, 503)},
              openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [UPLOAD_FIELD],
            "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}}}}}}})
    async def search(request: Request, limit: int | None = LIMIT, k: int | None = K, expand: bool = EXPAND,
                     filters: dict = Depends(search_filters)):
        """Upload an image in the multipart form field `file` (or as the whole body). The answer is
        `{"results": [...]}`, best first; each result has every field of `imgsim search --json`
        (rank, id, path, score, width, height, format, size, query) and the tutorial's `image_id`,
        `image_path` and `similarity`. The file's type is found by decoding it, never from its name."""
        started = time.perf_counter()
        body = await read_body(request, settings.max_upload_bytes, settings.timeout)
        upload = image_from_body(request.headers.get("content-type", ""), body)
        del body
        answer = await api.run(api.search_slots, api.search_upload, upload, result_count(limit, k),
                               {**filters, "expand": expand})
        answer["took_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return answer

    @app.get("/similar/{image_id}", summary="The indexed images most similar to an indexed one", response_model=None,
             responses={200: {"model": SearchAnswer}, **errors(401, 403, 404, 422, 501, 503)})
    async def similar(image_id: int = IMAGE_ID, limit: int | None = LIMIT, k: int | None = K, expand: bool = EXPAND,
                      filters: dict = Depends(search_filters)):
        """Searches with the stored vector (nothing is decoded or embedded again); the image itself
        is left out of its results."""
        started = time.perf_counter()
        answer = await api.run(api.search_slots, api.similar, image_id, result_count(limit, k),
                               {**filters, "expand": expand})
        answer["took_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return answer

    @app.get("/images/{image_id}", summary="The original file of an indexed image",
             response_class=Response, responses={200: {"content": {"image/*": {}}}, **errors(401, 403, 404, 422)})
    async def image(request: Request, image_id: int = IMAGE_ID):
        path, stored = await api.run(api.thumb_slots, api.locate, image_id)
        opened = await anyio.to_thread.run_sync(open_indexed, path, image_id)
        headers = {"ETag": opened.etag, "Cache-Control": "private, max-age=300",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(os.fsencode(Path(stored).name))}"}
        if etag_matches(request, opened.etag):
            opened.file.close()
            return Response(status_code=304, headers=headers)
        headers["Content-Length"] = str(opened.size)
        return StreamingResponse(stream(opened.file, opened.size), media_type=opened.media_type, headers=headers)

    @app.get("/thumbs/{image_id}", summary="A small JPEG of an indexed image (cached, with an ETag)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **errors(401, 403, 404, 422)})
    async def thumb(request: Request, image_id: int = IMAGE_ID):
        path, _ = await api.run(api.thumb_slots, api.locate, image_id)
        etag = await anyio.to_thread.run_sync(api.thumbs.identity, path, image_id)
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
        if etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        data = await api.run(api.thumb_slots, api.thumbs.get, path, image_id, etag)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/dupes", summary="Groups of duplicate and near-duplicate images",
             responses=errors(400, 401, 403, 422, 503))
    async def dupes(threshold: float | None = Query(None, ge=-1, le=1, description="Pairs scoring at least this "
                                                    f"are duplicates (default: {THRESHOLDS_SAID})."),
                    filters: dict = Depends(search_filters)):
        """The groups `imgsim dupes` finds: `{"groups": [{"keeper": id, "members": [...]}]}`, keeper first,
        each member with its score against the keeper (`identical` for byte-identical files)."""
        return await api.run(api.search_slots, api.dupes, threshold, filters)

    @app.get("/info", summary="The index: count, model, parameters; and what this server supports")
    async def info():
        return await api.run(api.search_slots, api.info)

    @app.get("/health", summary="Liveness: always {\"status\": \"ok\"} while the server runs")
    async def health():
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _install_docs(app)
    return app


def etag_matches(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, f"W/{etag}", "*") for tag in wanted.split(",")) if wanted else False


def _install_docs(app: FastAPI) -> None:
    """OpenAPI docs at /docs, from Swagger UI files installed locally (swagger-ui-py, part of the
    serve extra) so that they work offline; from Swagger's CDN only if those are missing."""
    try:
        import swagger_ui

        assets = Path(swagger_ui.__file__).with_name("static")
        if not (assets / "swagger-ui-bundle.js").is_file():
            raise ImportError
    except ImportError:
        assets = None
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if assets is None:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="imgsim API")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="imgsim API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def run(settings: ServeSettings, quiet: bool = False) -> None:
    """Serve until interrupted (what `imgsim serve` calls)."""
    import uvicorn

    sockets = _listen(settings.host, settings.port)  # first: a port in use is said before the index loads
    try:
        _serve(uvicorn, sockets, settings, quiet)
    finally:
        for sock in sockets:
            sock.close()


def _serve(uvicorn, sockets: list[socket.socket], settings: ServeSettings, quiet: bool) -> None:
    app = create_app(settings)
    shared: SharedIndex = app.state.api.shared
    with shared.use() as gen:
        count = len(gen.index)
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = sockets[0].getsockname()[1]  # the port given, or the one the system chose for port 0
    log.info("serving %s (%d images) at http://%s:%d/%s (Ctrl-C to stop)", settings.index, count, shown_host, port,
             " (browsers: open /?token=TOKEN once)" if settings.token else "")
    config = uvicorn.Config(
        app, host=settings.host, port=port,
        proxy_headers=False,  # never take the client's address from X-Forwarded-For: loopback checks rely on it
        server_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=5,
        limit_concurrency=settings.max_connections, access_log=False,
        log_level="warning" if quiet else "info",
    )
    uvicorn.Server(config).run(sockets=sockets)


def _listen(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound and listening before anything else happens, so that a port in use
    or an address this machine does not have is one error line (not uvicorn's log lines, exit code 3,
    or a traceback if another server took the port while the index loaded). As asyncio's
    `create_server` (what uvicorn does given a host) binds them: every address the host name resolves
    to ("" and None: every interface), IPv6 ones IPv6-only."""
    shown = f"[{host}]" if ":" in host else host
    try:
        addresses = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ImgsimError(f"cannot serve on {shown}:{port}: {e.strerror or e}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # the port the system chose for the first address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(2048)
    except BaseException as e:
        for sock in sockets:
            sock.close()
        if not isinstance(e, OSError):
            raise
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ImgsimError(f"cannot serve on {shown}:{port}: {why}") from None
    return sockets
