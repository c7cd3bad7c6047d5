"""An index exported to a Qdrant collection, and kept in sync with it.

The collection gets one point per image: the image id as point id, its metadata and labels as payload
(with payload indexes on the filterable fields), and its vector for cosine distance. Below 200 images
that is the stored vector; from 200 on, imgsim scores around the collection's mean, so the point
holds the vector minus the export centre (`state.py`), and a query must be centred the same way:
`imgsim embed FILE --json --index NAME` prints that query vector. Qdrant's cosine then ranks exactly
as imgsim's exact search does.

Run again, the export sends only what changed since the last one (new, moved or relabelled images),
deletes what was removed, and resumes after a crash: `state.py` explains how. Calls go in batches
and transient failures (connection errors, timeouts, 429 and 5xx answers) are retried with
exponential backoff.
"""

from __future__ import annotations

import logging
import random
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ImgsimError
from ..index import Index
from ..models import normalize
from . import require
from .source import ALL, Selection, Source, text_of
from .state import DEFAULT_RECENTRE_ABOVE, SyncState, diff

log = logging.getLogger("imgsim")
ProgressFn = Callable[[int, int], None]

DEFAULT_BATCH = 256
RETRIES = 6
BACKOFF_S = 0.5
BACKOFF_MAX_S = 20.0
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
NOT_INDEXED = {"sha256"}
"""Payload fields that get no payload index (nobody filters by them)."""


@dataclass
class QdrantReport:
    """What an export did: points written and deleted, points already up to date, points now there."""

    collection: str
    written: int = 0
    deleted: int = 0
    unchanged: int = 0
    points: int = 0
    recentred: bool = False
    created: bool = False
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["images_per_second"] = round(self.images_per_second, 1)
        return data


def connect(*, url: str | None = None, api_key: str | None = None, path: str | None = None, timeout: int = 60):
    """A QdrantClient for a server (`url`) or Qdrant's local mode in a folder (`path`), and the
    location key under which the index records what it exported there."""
    client_module = require("qdrant_client", "qdrant", "qdrant-client")
    if bool(url) == bool(path):
        raise ImgsimError("give either a Qdrant --url or a local --path")
    if path:
        folder = Path(path).resolve()
        try:
            client = client_module.QdrantClient(path=str(folder))
        except (RuntimeError, OSError) as e:
            raise ImgsimError(f"cannot open a local Qdrant in {folder}: {_first_line(e)}") from None
        return client, f"path:{folder}"
    try:
        client = client_module.QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
    except Exception as e:  # a malformed URL
        raise ImgsimError(f"cannot use Qdrant URL {url}: {_first_line(e)}") from None
    return client, f"url:{url.rstrip('/')}"


class Retrying:
    """Calls a client method, retrying transient failures with exponential backoff and jitter."""

    def __init__(self, client, where: str, retries: int = RETRIES, sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.where = where
        self.retries = retries
        self.sleep = sleep

    def __call__(self, method: str, *args, **kwargs):
        attempt = 0
        while True:
            try:
                return getattr(self.client, method)(*args, **kwargs)
            except Exception as e:
                unknown_host = _unknown_host(e)
                if unknown_host:
                    raise ImgsimError(f"cannot reach Qdrant at {self.where}: no such host ({unknown_host}); "
                                      f"check the URL, or run the export again once a service just started "
                                      f"has its name") from None
                transient, message = classify(e)
                if not transient:
                    raise ImgsimError(f"Qdrant at {self.where} refused {method}: {message}") from None
                attempt += 1
                if attempt > self.retries:
                    raise ImgsimError(f"Qdrant at {self.where} failed {attempt} times ({message}): run the "
                                      f"export again when it answers; it resumes where it stopped") from None
                delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
                log.warning("Qdrant %s failed (%s); trying again in %.1f s", method, message, delay)
                self.sleep(delay)


def classify(e: Exception) -> tuple[bool, str]:
    """(is it worth retrying, a one-line description)."""
    from qdrant_client.http.exceptions import (
        ResponseHandlingException,
        UnexpectedResponse,
    )

    if isinstance(e, UnexpectedResponse):
        status = e.status_code
        detail = _first_line(Exception(e.content.decode("utf-8", "replace"))) if e.content else e.reason_phrase
        if status in (401, 403):
            return False, f"HTTP {status}: check the API key (--api-key-env)"
        return status in TRANSIENT_STATUS, f"HTTP {status} {detail}"[:300]
    if isinstance(e, (ResponseHandlingException, ConnectionError, TimeoutError)):
        return True, _first_line(getattr(e, "source", None) or e)
    try:
        import httpx

        if isinstance(e, httpx.TransportError):
            return True, _first_line(e)
    except ImportError:  # pragma: no cover
        pass
    try:
        import grpc

        if isinstance(e, grpc.RpcError):
            code = e.code()
            transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
            return transient, f"gRPC {code.name}: {e.details()}"
    except ImportError:  # pragma: no cover
        pass
    return False, _first_line(e)


def _unknown_host(e: BaseException) -> str | None:
    """The resolver's answer if `e` (or what caused it) says the host name does not exist: nothing
    that waiting would change (a temporary resolver failure, EAI_AGAIN, is retried)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, socket.gaierror) and e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
            return _first_line(e)
        cause = e.__cause__ or e.__context__ or getattr(e, "source", None)  # qdrant-client keeps it as `source`
        e = cause if isinstance(cause, BaseException) else None
    return None


def export_qdrant(index: Index, client, location: str, collection: str, *, selection: Selection = ALL,
                  batch_size: int = DEFAULT_BATCH, recentre_above: float = DEFAULT_RECENTRE_ABOVE,
                  recentre: bool = False, recreate: bool = False, on_progress: ProgressFn | None = None,
                  retries: int = RETRIES, sleep: Callable[[float], None] = time.sleep) -> QdrantReport:
    """Bring `collection` in line with the selected images of `index` (open for writing: the export's
    state is recorded in it). `location` is the key from `connect`."""
    models = require("qdrant_client.models", "qdrant", "qdrant-client")
    if index.read_only:
        raise ImgsimError(f"{index.sqlite_path} is open read-only; a Qdrant export records its state in it")
    if batch_size < 1:
        raise ImgsimError("the batch size must be at least 1")
    if not collection or len(collection) > 255 or "/" in collection:
        raise ImgsimError(f"{collection!r} is not a valid collection name")
    started = time.perf_counter()
    call = Retrying(client, location.split(":", 1)[1], retries=retries, sleep=sleep)
    source = Source(index.store)
    state = SyncState(index.store)
    report = QdrantReport(collection)
    current = source.manifest.get("center")
    current = None if current is None else np.asarray(current, dtype=np.float32)
    version, centre, report.recentred = state.export_centre(current, recentre_above, force=recentre)
    target = state.target("qdrant", location, collection)

    exists = call("collection_exists", collection)
    if exists and recreate:
        call("delete_collection", collection)
        exists = False
    have: set[str] = set()
    if exists:
        info = _check_collection(call, collection, source, state.count(target.id))
        have = set(getattr(info, "payload_schema", None) or {})
    else:
        state.reset(target.id)
        target = state.target("qdrant", location, collection)
        _create_collection(call, models, collection, source)
        report.created = True
    _ensure_payload_indexes(call, models, collection, source, have)
    if target.centre_version != version:  # the collection's metadata first: a kill between the two redoes both
        call("update_collection", collection, metadata=_collection_metadata(source, version, centre))
        state.set_centre_version(target.id, version)
    elif exists:
        confirmed = state.count(target.id, confirmed=True)
        held = call("count", collection, exact=True).count
        if held < confirmed:  # points were deleted behind the index's back: send everything again
            log.warning("Qdrant collection %s holds %d points, fewer than the %d exported; sending all again",
                        collection, held, confirmed)
            state.set_centre_version(target.id, version)

    write, delete, report.unchanged = diff(source.id_fingerprints(selection), state.exported(target.id))
    total = len(write) + len(delete)
    done = 0
    for start in range(0, len(delete), batch_size):
        chunk = delete[start:start + batch_size]
        call("delete", collection, points_selector=models.PointIdsList(points=chunk), wait=True)
        state.forget(target.id, chunk)
        done += len(chunk)
        report.deleted += len(chunk)
        if on_progress:
            on_progress(done, total)
    for start in range(0, len(write), batch_size):
        chunk = write[start:start + batch_size]
        state.mark_pending(target.id, chunk)  # recorded before it is sent: see state.py
        for batch in source.batches(Selection(ids=chunk), batch_size=batch_size):
            vectors = batch.vectors if centre is None else normalize(batch.vectors - centre)
            payloads = _payloads(batch, source)
            points = [models.PointStruct(id=int(i), vector=v.tolist(), payload=p)
                      for i, v, p in zip(batch.ids.tolist(), vectors, payloads)]
            call("upsert", collection, points=points, wait=True)
            state.confirm(target.id, zip(batch.ids.tolist(), source.fingerprints(batch)))
            report.written += len(batch)
        done += len(chunk)
        if on_progress:
            on_progress(done, total)
    state.finish(target.id)
    report.points = state.count(target.id)
    report.seconds = time.perf_counter() - started
    return report


def _collection_metadata(source: Source, version: int, centre: np.ndarray | None) -> dict:
    m = source.manifest
    return {"imgsim": {"model": m["model"], "model_sha256": m["model_sha256"], "dim": source.dim,
                       "preprocess": m["preprocess"], "pooling": m.get("pooling"), "centre_version": version,
                       "centre": None if centre is None else [float(v) for v in centre],
                       "query": "normalise(embedding - centre), or the embedding if centre is null: "
                                "`imgsim embed FILE --json --index NAME` prints it"}}


def _create_collection(call, models, collection: str, source: Source) -> None:
    call("create_collection", collection,
         vectors_config=models.VectorParams(size=source.dim, distance=models.Distance.COSINE),
         metadata={"imgsim": {"model": source.manifest["model"], "dim": source.dim}})


def _ensure_payload_indexes(call, models, collection: str, source: Source, have: set[str]) -> None:
    """A payload index on every filterable field the collection lacks one for (columns added to the
    index since the collection was made get theirs on the next export)."""
    schema = {"integer": models.PayloadSchemaType.INTEGER, "real": models.PayloadSchemaType.FLOAT,
              "text": models.PayloadSchemaType.KEYWORD}
    fields = [(c.name, schema[c.affinity]) for c in source.columns
              if c.affinity in schema and c.name not in NOT_INDEXED]
    fields.append(("labels", models.PayloadSchemaType.KEYWORD))
    with warnings.catch_warnings():  # local mode says payload indexes have no effect there
        warnings.simplefilter("ignore")
        for name, field_schema in fields:
            if name not in have:
                call("create_payload_index", collection, field_name=name, field_schema=field_schema, wait=True)


def _check_collection(call, collection: str, source: Source, recorded: int):
    info = call("get_collection", collection)
    params = info.config.params.vectors
    size = getattr(params, "size", None)
    distance = str(getattr(params, "distance", ""))
    if size != source.dim or "cosine" not in distance.lower():
        raise ImgsimError(f"Qdrant collection {collection} holds {size}-d vectors by {distance or 'named vectors'}, "
                          f"not {source.dim}-d by cosine: choose another --collection, or --recreate it")
    theirs = (getattr(info.config, "metadata", None) or {}).get("imgsim", {})
    if theirs and theirs.get("model") != source.manifest["model"]:
        raise ImgsimError(f"Qdrant collection {collection} was exported from a {theirs.get('model')} index, not "
                          f"{source.manifest['model']}: choose another --collection, or --recreate it")
    if recorded == 0:
        count = call("count", collection, exact=True).count
        if count:
            raise ImgsimError(f"Qdrant collection {collection} already holds {count} points that this index did "
                              f"not export: choose another --collection, or --recreate it")
    return info


def _payloads(batch, source: Source) -> list[dict]:
    columns = [(c.name, batch.values[c.name]) for c in source.columns if c.affinity != "blob"]
    out = []
    for row_no in range(len(batch)):
        payload = {}
        for name, values in columns:
            value = values[row_no]
            payload[name] = text_of(value) if isinstance(value, bytes) else value
        payload["labels"] = batch.labels[row_no]
        out.append(payload)
    return out


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
