"""The index and model a server shares between its requests, and how it follows `imgsim index`.

One `Generation` is an open read-only `Index` with the model it searches with. Requests take the
current generation for their whole duration (`SharedIndex.use`). A watcher thread looks at the index
files every `poll_seconds`; when `imgsim index` (or anything else) has published a new FAISS file or
replaced the SQLite file, it opens a new generation, loads its graph, and swaps it in. Requests already
running finish on the old one, which is closed when its last request is done: nothing is dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImgsimError
from ..index import Index, index_files
from ..models import Model

log = logging.getLogger("imgsim.server")

Signature = tuple


def files_signature(path: str | os.PathLike) -> Signature:
    """What changes when a writer publishes a new state: the FAISS file is replaced by a rename
    (a new inode) once per `imgsim index` run, after the manifest commit that describes it; a
    re-created index is a new SQLite file. The SQLite file's own size and time change at every
    commit and checkpoint, which would reload mid-run for nothing: rows (paths after a move,
    removals) are read from SQLite at each search anyway."""
    faiss_file, sqlite_file = index_files(path)
    parts = []
    for file, fields in ((faiss_file, ("st_dev", "st_ino", "st_size", "st_mtime_ns")), (sqlite_file, ("st_dev", "st_ino"))):
        try:
            st = os.stat(file)
            parts.append(tuple(getattr(st, name) for name in fields))
        except OSError:
            parts.append(None)
    return tuple(parts)


@dataclass(eq=False)
class Generation:
    """An open index, the model its queries are embedded with, and the lock that serialises its
    SQLite connection and graph between request threads (a search holds it for about a millisecond)."""

    index: Index
    model: Model
    signature: Signature
    number: int
    loaded_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    retired: bool = False


class SharedIndex:
    """The current `Generation` of one index, replaced when its files change."""

    def __init__(self, path: str | os.PathLike, *, root: str | os.PathLike | None = None, poll_seconds: float = 1.0):
        self.path = os.fspath(path)
        self.root = root
        self.poll_seconds = poll_seconds
        self.reloads = 0
        self.last_reload_error: str | None = None
        self._guard = threading.Lock()
        self._reloading = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._current = self._open(previous=None, number=1)

    # -- using ---------------------------------------------------------------------------------------
    @contextmanager
    def use(self) -> Iterator[Generation]:
        """The current generation, kept open until the block ends even if a newer one arrives."""
        with self._guard:
            generation = self._current
            generation.users += 1
        try:
            yield generation
        finally:
            with self._guard:
                generation.users -= 1
                finished = generation.retired and generation.users == 0
            if finished:
                self._close(generation)

    @property
    def generation(self) -> int:
        return self._current.number

    # -- following the files -------------------------------------------------------------------------
    def check_for_update(self) -> bool:
        """Open the index again if its files changed since the current generation was opened.
        Returns True if a new generation is now in use. A failed open (files half-written by a
        writer that is not done, a damaged file) keeps the current one and is retried next time."""
        with self._reloading:
            current = self._current
            signature = files_signature(self.path)
            if signature == current.signature:
                return False
            try:
                fresh = self._open(previous=current, number=current.number + 1, signature=signature)
            except (ImgsimError, OSError) as e:
                if self.last_reload_error != str(e):
                    log.warning("index changed but could not be opened again, still serving the previous state: %s", e)
                self.last_reload_error = str(e)
                return False
            with self._guard:
                old, self._current = self._current, fresh
                old.retired = True
                finished = old.users == 0
            self.reloads += 1
            self.last_reload_error = None
            log.info("index files changed: now serving %d images (generation %d)", len(fresh.index), fresh.number)
        if finished:
            self._close(old)
        return True

    def start_watching(self) -> None:
        if self._watcher is not None or self.poll_seconds <= 0:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="imgsim-index-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check_for_update()
            except Exception:  # the watcher must outlive any surprise; requests keep the current state
                log.exception("checking the index files for changes failed")

    def close(self) -> None:
        """Stop watching and close the current generation once its requests are done."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None
        with self._guard:
            current = self._current
            current.retired = True
            finished = current.users == 0
        if finished:
            self._close(current)

    # -- opening -------------------------------------------------------------------------------------
    def _open(self, previous: Generation | None, number: int, signature: Signature | None = None) -> Generation:
        signature = files_signature(self.path) if signature is None else signature
        index = Index.open(self.path, read_only=True, root=self.root)
        try:
            info = index.info()
            if previous is not None and _same_model(previous.index.info(), info):
                model = previous.model  # the ONNX session is loaded once and shared across generations
            else:
                model = index.model
                model.embed(np.zeros((1, 3, model.preprocess.size, model.preprocess.size), np.float32))
            # Load (and if needed catch up) the graph now, not in the first request that needs it.
            index.graph.ann
        except BaseException:
            index.close()
            raise
        return Generation(index, model, signature, number)

    @staticmethod
    def _close(generation: Generation) -> None:
        with generation.lock:
            generation.index.close()


def _same_model(a: dict, b: dict) -> bool:
    return all(a.get(key) == b.get(key) for key in ("model", "model_sha256", "dimensions", "preprocess"))
