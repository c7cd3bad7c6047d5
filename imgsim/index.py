"""`Index`: the one object users hold. It ties the SQLite store, the FAISS graph and a model together.

An index is one name on disk: ``NAME.sqlite`` (rows, vectors, manifest; the source of truth) and
``NAME.faiss`` (the HNSW graph, derived; see `graph.py`). Image paths are stored relative to the
index's root folder, and the root relative to the index files, so a folder moved together with its
index keeps working.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import crop_codes
from . import expand as expansion
from . import images as imgs
from .hnsw import HnswParams
from .errors import (
    ImageError,
    ImgsimError,
    IndexCorruptError,
    IndexNotFoundError,
    ReadOnlyIndexError,
)
from .crops import CROP_VIEWS, DEFAULT_CROP_VIEWS
from .defaults import dupes_threshold
from .files import discard, leftover_stages, why_not_writable
from .filters import Filter
from .graph import Graph
from .lock import WriterLock
from .manifest import Manifest, format_for
from .models import Model, available_cpus, default_model
from .pipeline import bounded_map, embed_files
from .scoring import damaged_rows
from .store import ImageRow, NewImage, Store
from .sync import Plan, file_stat, is_under, link_stat, plan_sync

log = logging.getLogger("imgsim")

ProgressFn = Callable[[int, int], None]
SkipFn = Callable[[str, str], None]
Query = str | os.PathLike | Image.Image | np.ndarray | Sequence[float]


def index_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The (FAISS, SQLite) file pair for an index name; a name ending in either suffix also works.
    The name must name files: not empty, not a folder (`.`, `..`, `photos/`). (A folder of the same
    name may exist: `--index photos` beside the folder `photos` is the usual way.)"""
    text = os.fspath(path)
    base = Path(os.path.expanduser(text))
    if base.suffix in (".faiss", ".sqlite"):
        base = base.with_suffix("")
    if text.replace(os.sep, "/").rsplit("/", 1)[-1] in ("", ".", ".."):  # "", "/", "photos/", ".", "photos/."
        raise ImgsimError(f"index name {text!r} names a folder, not index files: give a name, such as "
                          f"{os.path.join(text, 'imgsim') if text else 'imgsim'} "
                          f"(for NAME.faiss and NAME.sqlite)")
    return base.with_name(base.name + ".faiss"), base.with_name(base.name + ".sqlite")


EMPTY_PATH = "the path is empty (an unset variable?); name a folder, `.` for the working folder"


def _user_path(path: str | os.PathLike) -> Path:
    """A path given by a user, `~` expanded. An empty one is refused: `Path("")` means the working
    folder, and `imgsim index "$UNSET"` must not index (or search) whatever folder it is run from."""
    text = os.fspath(path)
    if not text:
        raise ImgsimError(f"'': {EMPTY_PATH}")
    return Path(os.path.expanduser(text))


def _relative(folder: Path, base: Path) -> str:
    return Path(os.path.relpath(folder.resolve(), base.resolve())).as_posix()


def _link_new(source: Path, destination: Path) -> None:
    """Put `source` at `destination` atomically, refusing to replace an existing file."""
    try:
        os.link(source, destination)
    except FileExistsError:
        raise ImgsimError(f"an index already exists at {destination}: open it instead, or delete it first") from None
    except OSError:  # a filesystem without hard links
        if destination.exists():
            raise ImgsimError(f"an index already exists at {destination}") from None
        os.replace(source, destination)


def _refuse_unwritable(path, sqlite_path: Path) -> None:
    """Refuse to open for writing an index whose folder or file cannot be written (a read-only
    medium, another user's folder), saying so, rather than failing later in SQLite or the lock."""
    for what, target in (("the folder", sqlite_path.parent), ("the file", sqlite_path)):
        why = why_not_writable(target)
        if why:
            raise ReadOnlyIndexError(f"cannot write to index {path}: {what} {target} {why}; it can still be "
                                     f"searched (read-only)")


def _real(path: str | os.PathLike) -> Path:
    """`Path.resolve`; for a link that cannot be followed (into /proc/1, say), its folder resolved and
    its own name."""
    path = Path(path)
    try:
        return path.resolve()
    except OSError:
        return path.parent.resolve() / path.name


def _first_root(sources: list[Path], files: list[Path]) -> Path:
    """The root of an index that has none yet: the first source folder that holds one of the files
    found (else the first folder given; for files alone, the folder they share)."""
    folders = [s for s in sources if s.is_dir()]
    for folder in folders:
        if any(f.is_relative_to(folder) for f in files):
            return folder
    return folders[0] if folders else Path(os.path.commonpath([s.parent for s in sources]))


def _file_stat(path: str) -> tuple[int, int, int] | None:
    """A failed file's `file_stat`, to recognise it unchanged next time (a broken link's own, as
    `sync.link_stat`); None for a folder (looked at again each run: it costs nothing)."""
    try:
        st = os.stat(path)
    except OSError:
        return link_stat(path)
    return None if stat.S_ISDIR(st.st_mode) else file_stat(st)


def _damaged_database(sqlite_path: Path, e: sqlite3.DatabaseError) -> ImgsimError:
    """An SQLite error met after opening: damage in the file, or (locked, an I/O error) not."""
    if isinstance(e, sqlite3.OperationalError) and "malformed" not in str(e):
        return ImgsimError(f"the index database {sqlite_path} could not be read: {e}")
    return IndexCorruptError(f"the index database {sqlite_path} is damaged: {e}; restore it, or re-index")


def _items(given, one: tuple[type, ...] = (str,)) -> tuple:
    """What a caller gave where one item or several may be: several as they are, one (an instance of
    `one`) as a tuple of it, so that a name is one name and not its letters (``"soft60"``, a path)."""
    return (given,) if isinstance(given, one) else tuple(given)


def _views_text(index_views: tuple[str, ...], crop_views: tuple[str, ...]) -> str:
    """How an index's extra views read in a message."""
    parts = ([f"{', '.join(index_views)} averaged in"] if index_views else []) + \
        ([f"crop views {', '.join(crop_views)}"] if crop_views else [])
    return "; ".join(parts) or "no extra view"


def _guard_database(method):
    """Turn SQLite errors that the open-time checks could not foresee (a file damaged or taken away
    while open) into `IndexCorruptError`, for Python users and the CLI alike."""

    def translate(self, e: sqlite3.DatabaseError) -> ImgsimError:
        return _damaged_database(self.sqlite_path, e)

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator(self, *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except sqlite3.DatabaseError as e:
                raise translate(self, e) from None
        return generator

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise translate(self, e) from None
    return wrapper


@dataclass(frozen=True)
class SearchResult:
    """One neighbour of a query. `score` is cosine similarity: 1.0 is identical, higher is closer.
    `path` is relative to the index's root; `abspath` is where the file is now."""

    rank: int
    id: int
    path: str
    score: float
    width: int
    height: int
    format: str
    size: int
    query: str | None = None
    abspath: str = ""
    date: str = ""
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data


@dataclass
class SyncReport:
    """What an `add` or `sync` did. `failures` holds (path, reason) for each skipped file."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    kept: int = 0
    """Without removals (`add`, or `sync` with ``remove_missing=False``): entries under the folders
    walked whose files were not found there (gone, or excluded), kept as they were."""
    unchanged: int = 0
    failed: int = 0
    embedded: int = 0
    known_failures: int = 0
    """Files that failed before and are unchanged since: not tried again (see `retry_failed`)."""
    unsupported: int = 0
    """Image files of kinds imgsim cannot decode here (SVG, JPEG XL, camera raw, HEIC without the
    heif extra...), left out."""
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def files_seen(self) -> int:
        """Image files found in what was indexed (whatever became of them)."""
        return (self.added + self.updated + self.moved + self.unchanged + self.failed + self.known_failures
                + self.unsupported)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "failures"}
        data["seconds"] = round(self.seconds, 3)
        data["images_per_second"] = round(self.images_per_second, 1)
        return data


@dataclass(frozen=True)
class QueryOutcome:
    """The results for one query of `Index.search_many`, or why it could not be searched."""

    query: str
    results: list[SearchResult]
    error: str | None = None


class Index:
    """An image similarity index. Use `Index.create`, `Index.open` or `Index.open_or_create`, ideally
    as a context manager."""

    def __init__(self, base: Path, store: Store, manifest: Manifest, root_override: str | os.PathLike | None = None,
                 lock: WriterLock | None = None):
        self.faiss_path, self.sqlite_path = index_files(base)
        self._store = store
        self._lock = lock
        self._manifest = manifest
        self._root_override = Path(os.path.expanduser(os.fspath(root_override))).resolve() if root_override else None
        self._model: Model | None = None
        self.graph = Graph(store, manifest, self.faiss_path)
        self._fresh = False  # made by `create` in this process and nothing stored yet

    # -- opening and closing ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, *, model: str | None = None, root: str | os.PathLike | None = None,
               hnsw: HnswParams | None = None, index_views: Iterable[str] = (),
               crop_views: Iterable[str] | None = DEFAULT_CROP_VIEWS) -> Index:
        """Create a new, empty index at `path` (files PATH.faiss and PATH.sqlite).

        `model` is a catalogue name (default: resnet50 when installed, else the bundled model);
        `root` is the folder image paths are stored relative to (default: the first folder added);
        `crop_views` keep the vectors of each indexed picture's centre too (as 2-bit codes), and a
        search's best candidates score by them as well (finds tight crops, grey or not; indexing
        embeds each picture once more per view; see `crops.py`): by default
        `crops.DEFAULT_CROP_VIEWS` (``("soft60",)``, the centre 60 % in grey, seen sharp and
        blurred), `crops.CROP_VIEWS`
        (``("grey70", "grey50")``) with ``imgsim index --centre-view``, none (``()``) with
        ``--no-centre-view``. `index_views` (older, averaged into the image's own vector instead)
        are still accepted.
        If the `with` block of a new index fails before anything was stored, the index is removed
        again, so that a retry starts afresh.
        """
        faiss_path, sqlite_path = index_files(path)
        if sqlite_path.exists():
            raise ImgsimError(f"an index already exists at {sqlite_path}: open it instead, or delete it first")
        if not sqlite_path.parent.is_dir():
            raise IndexNotFoundError(f"cannot create index {path}: the index folder {sqlite_path.parent} "
                                     f"does not exist")
        unwritable = why_not_writable(sqlite_path.parent)
        if unwritable:
            raise ReadOnlyIndexError(f"cannot create index {path}: the folder {sqlite_path.parent} {unwritable}; "
                                     f"create it somewhere writable (indexes already there can still be searched)")
        if model is None:
            model, why = default_model()
            log.info("model: %s (%s)", model, why)
        loaded = Model.load(model)
        try:
            crop_views = DEFAULT_CROP_VIEWS if crop_views is None else _items(crop_views)
            preprocess = replace(loaded.preprocess, index_views=_items(index_views), crop_views=crop_views,
                                 crop_code=crop_codes.TWO_BIT if crop_views else crop_codes.FLOAT16)
        except ValueError as e:
            raise ImgsimError(str(e)) from None
        root_key = None if root is None else _relative(Path(os.path.expanduser(os.fspath(root))), sqlite_path.parent)
        manifest = Manifest(format_version=format_for(preprocess),
                            model=loaded.name, model_sha256=loaded.sha256, dim=loaded.dim, preprocess=preprocess,
                            hnsw=hnsw or HnswParams(), pooling=loaded.pooling, root=root_key, created=time.time())
        # Built under a temporary name and linked into place whole, so a crash never leaves a half-made index.
        staging = sqlite_path.with_name(f".{sqlite_path.name}.{os.getpid()}.new")
        try:
            store = Store.create(staging, dim=loaded.dim)
            with store.transaction():
                store.set_manifest(**manifest.to_stored())
            store.close()
            _link_new(staging, sqlite_path)
        finally:
            for leftover in (staging, Path(f"{staging}-wal"), Path(f"{staging}-shm")):
                leftover.unlink(missing_ok=True)
        index = cls.open(path)
        if preprocess == loaded.preprocess:
            index._model = loaded
        index._fresh = True
        return index

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False, root: str | os.PathLike | None = None) -> Index:
        """Open an existing index. `read_only` allows no writes and needs no write access to its folder;
        `root` overrides where image files are looked for."""
        faiss_path, sqlite_path = index_files(path)
        if not sqlite_path.exists():
            raise IndexNotFoundError(f"no index at {path} ({sqlite_path.name} not found): "
                                     f"create one with `imgsim index FOLDER --index {path}`")
        if root is not None and not Path(os.path.expanduser(os.fspath(root))).is_dir():
            raise ImgsimError(f"root folder {os.fspath(root)} does not exist: give the folder the indexed images "
                              f"are in now")
        if not read_only:
            _refuse_unwritable(path, sqlite_path)
        lock = None if read_only else WriterLock.acquire(sqlite_path)
        try:
            store = Store.open(sqlite_path, read_only=read_only)
            try:
                manifest = Manifest.from_stored(store.manifest(), sqlite_path)
            except sqlite3.DatabaseError as e:  # a page damaged where the opening checks do not read
                store.close()
                raise _damaged_database(sqlite_path, e) from None
            except BaseException:
                store.close()
                raise
            index = cls(Path(path), store, manifest, root_override=root, lock=lock)
            if lock:  # the writer: remove FAISS files a killed writer staged but never renamed
                for leftover in leftover_stages(faiss_path):
                    discard(leftover)
        except BaseException:
            if lock:
                lock.release()
            raise
        return index

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, *, model: str | None = None,
                       root: str | os.PathLike | None = None, index_views: Iterable[str] | None = None,
                       crop_views: Iterable[str] | None = None) -> Index:
        """Open the index at `path` for writing, or create it. A `model` (or `index_views`, or
        `crop_views`) other than the one an existing index was made with is refused (an index holds
        one kind of vector). None: whatever an existing index was made with, and
        `crops.DEFAULT_CROP_VIEWS` for a new one. `crops.CROP_VIEWS` (``--centre-view``) asked of
        an index made with centre views averaged in (``--centre-view`` before crop views) or with
        colour crop views (before grey ones) are taken as those: it keeps indexing as it was made."""
        index_views = None if index_views is None else _items(index_views)  # read more than once below
        crop_views = None if crop_views is None else _items(crop_views)
        _, sqlite_path = index_files(path)
        if not sqlite_path.exists():
            return cls.create(path, model=model, root=root, index_views=index_views or (),
                              crop_views=DEFAULT_CROP_VIEWS if crop_views is None else crop_views)
        index = cls.open(path)
        if model and model != index.model_name:
            index.close()
            raise ImgsimError(f"index {path} was made with {index.model_name}, not {model}: "
                              f"use another --index for a {model} index")
        made = index.manifest.preprocess
        if crop_views == CROP_VIEWS and index_views is None and (made.index_views or made.crop_views) and \
                (not made.crop_views or all(not imgs.parse_view(v)[1] for v in made.crop_views)):
            crop_views = None  # `--centre-view` on an index made with an older kind of centre views: as made
        if (index_views is not None and index_views != made.index_views) or \
                (crop_views is not None and crop_views != made.crop_views):
            index.close()
            asked = _views_text(made.index_views if index_views is None else index_views,
                                made.crop_views if crop_views is None else crop_views)
            raise ImgsimError(f"index {path} was made with {_views_text(made.index_views, made.crop_views)}: "
                              f"views are chosen when an index is made, so use another --index to index with {asked}")
        return index

    def close(self, discard_if_fresh: bool = False) -> None:
        """Write the FAISS file if it changed, and release the files."""
        if self._store is None:
            return
        remove = discard_if_fresh and self._fresh and len(self._store) == 0 and not self._store.errors()
        try:
            if self.graph.dirty and not self.read_only and not remove:
                self.graph.save()
        finally:
            self._store.close()
            self._store = None
            if remove:
                for leftover in (self.sqlite_path, self.faiss_path):
                    leftover.unlink(missing_ok=True)
            if self._lock:
                self._lock.release()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(discard_if_fresh=exc_type is not None)

    # -- properties ------------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return self._store.read_only

    @property
    def manifest(self) -> Manifest:
        """What the index says about itself (model, preprocessing, graph parameters, ...)."""
        return self._manifest

    @property
    def model_name(self) -> str:
        return self._manifest.model

    @property
    def model(self) -> Model:
        """The model this index was made with, loaded and checked on first use."""
        if self._model is None:
            m = self._manifest
            self._model = Model.load(m.model, expect_sha256=m.model_sha256, preprocess=m.preprocess, pooling=m.pooling)
        return self._model

    @property
    def root(self) -> Path | None:
        if self._root_override is not None:
            return self._root_override
        if self._manifest.root is None:
            return None
        # Resolved once per root value: resolving (a syscall per folder) for every search result cost ms.
        cached = getattr(self, "_root_resolved", None)
        if cached is None or cached[0] != self._manifest.root:
            cached = self._root_resolved = (self._manifest.root,
                                            (self.sqlite_path.parent / self._manifest.root).resolve())
        return cached[1]

    @_guard_database
    def __len__(self) -> int:
        return len(self._store)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndexError(f"{self.sqlite_path} is open read-only")

    def _set_root(self, folder: Path) -> None:
        relative = _relative(folder, self.sqlite_path.parent)
        with self._store.transaction():
            self._store.set_manifest(root=relative)
        self._manifest.root = relative

    # -- paths -----------------------------------------------------------------------------------
    def _key(self, path: Path) -> str:
        """How a file's path is stored: relative to the root (POSIX separators), or absolute if outside it."""
        absolute = Path(os.path.abspath(path))
        root = self.root
        if root is not None:
            try:
                return absolute.relative_to(root).as_posix()
            except ValueError:
                pass
        return absolute.as_posix()

    def folder_key(self, folder: str) -> str:
        """A folder given by the user, as filters and `--reference` take it, in its stored form. A
        folder on disk (absolute, or relative to the working folder, through links or not) is
        stored relative to the root if it is under it, else with its absolute path (files indexed
        from outside the root); the root, or a folder holding it, is everything; text that names no
        folder on disk is taken as stored."""
        path = Path(os.path.expanduser(folder))
        try:
            on_disk = [path, path.resolve()] if folder and path.is_dir() else []
        except (OSError, RuntimeError):  # a name too long, a loop of links: not a folder on disk
            on_disk = []
        if not on_disk:
            return folder
        root = self.root
        if root is not None and any(p == root or p in root.parents
                                    for p in (Path(os.path.abspath(q)) for q in on_disk)):
            return ""  # the root, or a folder holding it: everything under the root
        keys = [self._key(candidate) for candidate in on_disk]  # as walked (through links), and as it is
        under_root = [key for key in keys if not key.startswith("/")]
        return under_root[0] if under_root else keys[0]

    def resolve(self, stored_path: str) -> Path:
        """The file a stored path refers to now."""
        path = Path(stored_path)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    # -- the graph -------------------------------------------------------------------------------
    @_guard_database
    def rebuild(self) -> None:
        """Rebuild the FAISS file from the vectors in SQLite (with today's graph layout, and today's
        efConstruction where the index recorded a lower one: see `Graph.rebuild`)."""
        self._writable()
        self.graph.rebuild()

    # -- adding ----------------------------------------------------------------------------------
    def add(self, sources: str | os.PathLike | Iterable[str | os.PathLike], *, on_progress: ProgressFn | None = None,
            on_skip: SkipFn | None = None, batch_size: int = 16, max_pixels: int = imgs.DEFAULT_MAX_PIXELS,
            exclude: Iterable[str] = (), label_from_folder: bool = False, retry_failed: bool = False) -> SyncReport:
        """Add image files and folders (walked recursively). Unchanged files are not embedded again,
        a moved file keeps its vector, and nothing is removed; see `sync` for that.

        `exclude` holds glob patterns (matched against the path relative to each folder added, and
        against the file name) of files to leave out; `label_from_folder` labels each new image with
        the name of the folder it is in. A file that failed before and is unchanged (size, mtime,
        ctime) is not tried again unless `retry_failed`; it stays in `errors()`."""
        return self._update(sources, remove_missing=False, on_progress=on_progress, on_skip=on_skip,
                            batch_size=batch_size, max_pixels=max_pixels, exclude=exclude,
                            label_from_folder=label_from_folder, retry_failed=retry_failed)

    def sync(self, folder: str | os.PathLike, *, remove_missing: bool = True, on_progress: ProgressFn | None = None,
             on_skip: SkipFn | None = None, batch_size: int = 16, max_pixels: int = imgs.DEFAULT_MAX_PIXELS,
             exclude: Iterable[str] = (), label_from_folder: bool = False, retry_failed: bool = False) -> SyncReport:
        """Make the index match `folder`: embed new and changed files, follow moved ones and, unless
        `remove_missing` is false, remove entries for files under `folder` that are gone (or excluded)."""
        return self._update([folder], remove_missing=remove_missing, on_progress=on_progress, on_skip=on_skip,
                            batch_size=batch_size, max_pixels=max_pixels, exclude=exclude,
                            label_from_folder=label_from_folder, retry_failed=retry_failed)

    @_guard_database
    def _update(self, sources, *, remove_missing: bool, on_progress, on_skip, batch_size: int,
                max_pixels: int, exclude: Iterable[str], label_from_folder: bool,
                retry_failed: bool = False) -> SyncReport:
        self._writable()
        started = time.perf_counter()
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        sources = [_user_path(s) for s in sources]
        for source in sources:
            if not source.exists() and not source.is_symlink():
                raise ImgsimError(f"{source} does not exist")
        # Where the files really are (a folder given through a link, `~/Pictures -> /data/photos`, is
        # walked as /data/photos), so that their paths are stored relative to the resolved root.
        sources = [s.resolve() if s.is_dir() else s.parent.resolve() / s.name for s in sources]
        report = SyncReport()
        unreadable: list[tuple[str, str]] = []
        unsupported: list[tuple[str, str]] = []
        files = list(imgs.expand(sources, on_error=lambda path, reason: unreadable.append((str(path), reason)),
                                 exclude=tuple(exclude),
                                 on_unsupported=lambda path, reason: unsupported.append((str(path), reason))))
        if self.root is None and (files or unreadable):  # an empty folder would pin it for good
            self._set_root(_first_root(sources, files))
        report.unsupported = len(unsupported)
        walked = [self._key(s.resolve()) for s in sources if s.is_dir()]
        plan = plan_sync(files, self._store, key=self._key, resolve=self.resolve,
                         walked_prefixes=walked, remove_missing=remove_missing,
                         unseen_prefixes=[self._key(_real(path)) for path, _ in unreadable],
                         known_failures=None if retry_failed else self._store.failed_file_stats())
        plan.failures[:0] = unreadable  # reported and counted; what was indexed under them is kept
        carried = self._apply_plan(plan, report, label_from_folder)
        stale = [p for p, _, _ in self._store.errors() if p not in plan.known_failed
                 and (p in plan.seen or (remove_missing and is_under(p, walked)))]
        with self._store.transaction():
            self._store.forget_errors(stale)  # they are tried again now, and recorded again if they fail
        self._embed_new(plan, report, on_progress, on_skip, batch_size, max_pixels, label_from_folder, carried)
        if report.added or report.updated or report.removed or report.moved:
            self._fresh = False
        report.known_failures = len(plan.known_failed)
        report.seconds = time.perf_counter() - started
        return report

    def _apply_plan(self, plan: Plan, report: SyncReport, label_from_folder: bool) -> dict[str, list[str]]:
        """Write what needs no embedding: moves, touched files, copies of known images, removals.
        Returns the labels that the replaced files' new rows are to get (`_labels_to_carry`)."""
        graph = self.graph
        graph.ann  # loaded (and caught up) before new rows exist, so none is added twice
        carried = self._labels_to_carry(plan)
        with self._store.transaction():
            for row_id, key, size, mtime_ns in plan.moves:
                self._store.update_file(row_id, key, size, mtime_ns)
            for row_id, key, size, mtime_ns in plan.touched:
                self._store.update_file(row_id, key, size, mtime_ns)
            self._store.delete(plan.removals)  # a replaced file's row goes with its new one (`_embed_new`)
            source_ids = [source_id for _, source_id in plan.copies]
            vectors = self._store.vectors_by_id(source_ids, self._manifest.dim)
            sources = self._store.rows_by_id(source_ids)
            crops = self._source_crops(source_ids)
            copies = []
            for item, source_id in plan.copies:
                # Its stored vector or crop views are damaged: embedded instead.
                if source_id not in vectors or (crops is not None and source_id not in crops):
                    plan.to_embed.append(item)
                    continue
                source = sources[source_id]
                copies.append(NewImage(item.key, item.size, item.mtime_ns, item.sha256, source.width, source.height,
                                       source.format, vectors[source_id], source.taken, source.camera,
                                       None if crops is None else crops[source_id]))
            new_ids = self._insert(copies, label_from_folder)
        if copies:
            graph.add(new_ids, np.stack([c.vector for c in copies]))
        if plan.removals:
            graph.forget_removed()
        report.moved = len(plan.moves)
        report.unchanged = plan.unchanged + len(plan.touched)
        report.removed, report.kept = len(plan.removals), plan.kept
        report.added = len(copies)
        return carried

    def _labels_to_carry(self, plan: Plan) -> dict[str, list[str]]:
        """{stored path: labels} for files whose content changed at the same path (their rows are
        replaced): the labels of the row that held that content before, if another replaced file did
        (two files that swapped names keep their labels), else of the row at that path (an edited
        picture keeps its own)."""
        if not plan.replaced:
            return {}
        labels = self._store.labels_by_id(plan.replaced)
        if not labels:
            return {}
        holder = dict(zip(plan.replaced_hashes, plan.replaced))
        digest = {c.key: c.sha256 for c in plan.to_embed}
        carried = {}
        for row_id, key in zip(plan.replaced, plan.replaced_keys):
            found = labels.get(holder.get(digest.get(key), row_id))
            if found:
                carried[key] = found
        return carried

    def _source_crops(self, ids: list[int]) -> dict[int, tuple[bytes, ...]] | None:
        """The crop views, as stored, of each of `ids` that has them whole; None for an index without
        crop views."""
        prep, dim = self._manifest.preprocess, self._manifest.dim
        views = len(prep.crop_views)
        if not views:
            return None
        size = crop_codes.blob_size(prep.crop_code, dim)
        joined = self._store.crop_blobs(ids, views, size)
        hurt = crop_codes.damaged(prep.crop_code, b"".join(joined.values()), len(joined) * views, dim)
        return {i: tuple(blob[v * size:(v + 1) * size] for v in range(views))
                for (i, blob), bad in zip(joined.items(), hurt.reshape(len(joined), views).any(axis=1)) if not bad}

    def _insert(self, images: list[NewImage], label_from_folder: bool) -> list[int]:
        """Insert rows (inside the caller's transaction), labelled by their folder's name if asked."""
        if not label_from_folder:
            return self._store.insert(images)
        ids = []
        for image in images:
            folder = image.path.rpartition("/")[0].rpartition("/")[2]
            ids += self._store.insert([image], labels=[folder] if folder else [])
        return ids

    def _embed_new(self, plan: Plan, report: SyncReport, on_progress, on_skip, batch_size: int,
                   max_pixels: int, label_from_folder: bool, carried: dict[str, list[str]]) -> None:
        if plan.failures:
            with self._store.transaction():
                self._record_failures(plan.failures, report, on_skip)
        if not plan.to_embed:
            if self.graph.dirty:
                self.graph.save()
            return
        model = self.model
        replaced = dict(zip(plan.replaced_keys, plan.replaced))
        done = 0
        for batch, failures in embed_files(plan.to_embed, model, batch_size=batch_size, max_pixels=max_pixels):
            with self._store.transaction():
                # A file whose content changed: its old row goes in the transaction that writes its new
                # one (or its failure), so an interrupted run leaves it as it was, labels and all.
                keys = [image.path for image in batch] + [self._key(Path(path)) for path, _ in failures]
                self._store.delete([replaced[key] for key in keys if key in replaced])
                new_ids = self._insert(batch, label_from_folder)
                for image, new_id in zip(batch, new_ids):
                    if image.path in carried:
                        self._store.add_labels([new_id], carried[image.path])
                self._record_failures(failures, report, on_skip)
            if batch:
                self.graph.add(new_ids, np.stack([image.vector for image in batch]))
            for image in batch:
                if image.path in replaced:
                    report.updated += 1
                else:
                    report.added += 1
            report.embedded += len(batch)
            done += len(batch) + len(failures)
            if on_progress:
                on_progress(done, len(plan.to_embed))
        if replaced:
            self.graph.forget_removed()
        self.graph.save()

    def _record_failures(self, failures: list[tuple[str, str]], report: SyncReport, on_skip: SkipFn | None) -> None:
        """Keep (path, reason) failures in the errors table (inside the caller's transaction), count
        them in `report`, and tell `on_skip`."""
        self._store.record_errors([(self._key(Path(path)), reason) for path, reason in failures],
                                  [_file_stat(path) for path, _ in failures])
        report.failed += len(failures)
        report.failures.extend(failures)
        for path, reason in failures:
            if on_skip:
                on_skip(path, reason)

    # -- labels ----------------------------------------------------------------------------------
    @_guard_database
    def label(self, images: str | os.PathLike | int | Iterable[str | os.PathLike | int], *,
              add: str | Iterable[str] = (), remove: str | Iterable[str] = ()) -> int:
        """Add and remove labels on indexed images (paths, files or ids, or one of them; a folder means
        every indexed image under it). Returns how many images' labels changed: one that already had every label
        added, and none of those removed, is not counted. A label cannot be both added and removed."""
        self._writable()
        images = _items(images, (str, os.PathLike, int, np.integer))
        add, remove = _items(add), _items(remove)
        add, remove = Filter(labels=tuple(add)).labels, Filter(labels=tuple(remove)).labels
        if both := sorted(set(add) & set(remove)):
            raise ImgsimError(f"label {both[0]!r} is both added and removed")
        ids = self._ids_of(images)
        with self._store.transaction():
            before = self._store.labels_by_id(ids)
            self._store.add_labels(ids, add)
            self._store.remove_labels(ids, remove)
        had = {i: set(before.get(i, ())) for i in ids}
        return sum((labels | set(add)) - set(remove) != labels for labels in had.values())

    def _ids_of(self, images: Iterable[str | os.PathLike | int]) -> list[int]:
        """Ids of indexed images named by id, by file, or by folder (everything indexed under it)."""
        ids: list[int] = []
        for item in images:
            if isinstance(item, (int, np.integer)):
                if not self._store.rows_by_id([int(item)]):
                    raise ImgsimError(f"no image with id {item} in this index")
                ids.append(int(item))
                continue
            ids += [row.id for row in self._rows_named(item)]
        return sorted(set(ids))

    def _rows_named(self, item: str | os.PathLike) -> list[ImageRow]:
        """The indexed rows for a file or a folder given by the user (absolute, relative to the working
        folder, or as stored), or one id written as text."""
        text = os.fspath(item)
        if not text:
            raise ImgsimError(f"'': {EMPTY_PATH}")
        if isinstance(item, str) and text.isdigit() and not Path(text).exists():
            rows = self._store.rows_by_id([int(text)])
            if not rows and self._store.row_by_path(text) is None:
                raise ImgsimError(f"no image with id {text} in this index")
            if rows:
                return list(rows.values())
        path = Path(os.path.expanduser(text))
        # (stored key, whether it names a folder on disk): the file or folder as it is on disk, then the
        # text as a stored path. A stored "." means nothing; the root folder given on disk means everything.
        # Through a link (as indexing walked it) and as it really is: either may be how it is stored.
        on_disk = dict.fromkeys([Path(os.path.abspath(path)), path.resolve()]) if path.exists() else {}
        keys = [(self._key(p), path.is_dir()) for p in on_disk]
        keys.append((Path(text).as_posix(), None))
        for key, is_dir in keys:
            row = self._store.row_by_path(key)
            if row is not None:
                return [row]
            if is_dir is False or (key in ("", ".") and not is_dir):
                continue
            where, params = Filter(folders=(key,)).where()
            rows = list(self._store.rows_where(where, params))
            if rows:
                return rows
        raise ImgsimError(f"{text} is not in this index (see `imgsim list`; `imgsim search` takes any picture)")

    # -- searching -------------------------------------------------------------------------------
    def embed(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        """The normalised embedding of an image file or a PIL image, as this index's model sees it."""
        return self.model.embed(imgs.to_array(self._query_picture(image), self.model.preprocess)[None])[0]

    def query_vectors(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        """The vectors a search with this image compares, as an (N, dim) array: its embedding, and
        where it looks turned onto a plain canvas (black corners: `imgsim.upright`), the embedding
        of the picture turned back upright (one more model run, for such queries only)."""
        return self.model.embed(imgs.query_arrays(self._query_picture(image), self.model.preprocess))

    def _query_picture(self, image: str | os.PathLike | Image.Image) -> Image.Image:
        if isinstance(image, Image.Image):
            return imgs.to_rgb(image)
        try:
            return imgs.decode(os.path.expanduser(os.fspath(image)), imgs.index_decode_size(self.model.preprocess)).image
        except ImageError as e:
            raise ImageError(f"cannot read query {os.fspath(image)}: {e}") from None

    @_guard_database
    def search(self, query: Query, k: int = 10, *, filter: Filter | None = None, min_score: float | None = None,
               exact: bool = False, ef: int | None = None,
               expand: bool | expansion.Expansion = True) -> list[SearchResult]:
        """The `k` indexed images closest to `query`: an image file, a PIL image, or a vector.

        `filter` keeps only matching images (inside the vector search; never fewer than `k` results
        while `k` images match), `min_score` drops weaker matches, `exact` compares against every
        vector instead of walking the graph, and `ef` sets how deep the graph walk looks.
        `expand` (the default) ranks the results for the query together with its best match (which
        stays first; see `imgsim.expand`); ``expand=False`` ranks them by the query alone. Either way
        `score` is the query's own similarity to each result (in an index with crop views, to the
        result or, less `crops.CROP_PENALTY`, to its best crop view, whichever is higher).

        An image that looks turned onto a plain canvas is searched both as it is and turned back
        upright (`query_vectors`), and the results of whichever finds the closer best match are
        returned. A 2-d array of vectors is taken as such views of *one* query (`query_vectors`'
        rows) and searched that way: one list of results, not one per row.
        """
        name = os.fspath(query) if isinstance(query, (str, os.PathLike)) else None
        if isinstance(query, (list, tuple)):  # numbers: a vector (or rows of views) given as a list
            try:
                query = np.asarray(query, dtype=np.float32)
            except (TypeError, ValueError):
                raise ImgsimError("a query given as a list must be numbers: a vector") from None
        vectors = np.asarray(query) if isinstance(query, np.ndarray) else self.query_vectors(query)
        return self._search_views(vectors, k, filter=filter, min_score=min_score, exact=exact, ef=ef, query=name,
                                  expand=expand)

    def _search_views(self, vectors: np.ndarray, k: int, **how) -> list[SearchResult]:
        """`_search_vector` for one vector, or for each row of a 2-d array (views of one query): the
        results whose best match scores highest (the first view's on a tie)."""
        if vectors.ndim > 2:
            raise ImgsimError(f"a query is a vector, or a 2-d array of one query's views; not a {vectors.ndim}-d array")
        if vectors.ndim == 2 and not len(vectors):
            raise ImgsimError("no query vector: the array has no rows")
        if vectors.ndim != 2 or len(vectors) < 2:
            return self._search_vector(vectors, k, **how)
        how["allowed"], how["filter"] = self._allowed(how["filter"]), None  # the filter's ids read once
        best: list[SearchResult] | None = None
        for vector in vectors:
            found = self._search_vector(vector, k, **how)
            if best is None or (found and (not best or found[0].score > best[0].score)):
                best = found
        return best

    @_guard_database
    def search_many(self, queries: str | os.PathLike | Iterable[str | os.PathLike], k: int = 10, *,
                    filter: Filter | None = None,
                    min_score: float | None = None, exact: bool = False, ef: int | None = None,
                    batch_size: int = 16, expand: bool | expansion.Expansion = True) -> Iterator[QueryOutcome]:
        """Search with many image files (folders are walked), embedded in batches while the next
        ones decode. A file that cannot be read gives an outcome with `error` set; the rest go on."""
        queries = [os.fspath(q) for q in _items(queries, (str, os.PathLike))]
        files: list[Path] = []
        for query in queries:
            if not query:  # Path("") is the working folder: never search it unasked
                yield QueryOutcome(query, [], f"cannot read query '': {EMPTY_PATH}")
                continue
            found = list(imgs.expand([_user_path(query)]))
            if not found:  # a folder without a single image file
                yield QueryOutcome(query, [], f"no image files in {query}")
            files += found
        prep = self.model.preprocess

        def decode(path: Path):
            try:
                return path, imgs.load_query(path, prep)[0], None
            except ImageError as e:
                return path, None, f"cannot read query {path}: {e}"

        pending: list[tuple[Path, np.ndarray | None, str | None]] = []

        def flush() -> Iterator[QueryOutcome]:
            arrays = [a for _, a, _ in pending if a is not None]  # each (views, 3, size, size)
            vectors = self.model.embed(np.concatenate(arrays)) if arrays else None
            at = 0
            for path, array, error in pending:
                if array is None:
                    yield QueryOutcome(str(path), [], error)
                else:
                    views, at = vectors[at:at + len(array)], at + len(array)
                    yield QueryOutcome(str(path), self._search_views(views, k, filter=filter, min_score=min_score,
                                                                     exact=exact, ef=ef, query=str(path),
                                                                     expand=expand))
            pending.clear()

        for item in bounded_map(decode, files, workers=available_cpus(), window=2 * batch_size):
            pending.append(item)
            if len(pending) >= batch_size:
                yield from flush()
        yield from flush()

    @_guard_database
    def similar(self, image: str | os.PathLike | int, k: int = 10, *, filter: Filter | None = None,
                min_score: float | None = None, exact: bool = False, ef: int | None = None,
                expand: bool | expansion.Expansion = True) -> list[SearchResult]:
        """The `k` images most like one that is already indexed (a path or an id), using its stored
        vector (nothing is embedded again); the image itself is left out (also as the best match that
        `expand` ranks with: see `search`)."""
        rows = self._rows_named(image) if not isinstance(image, (int, np.integer)) else \
            list(self._store.rows_by_id([int(image)]).values())
        if len(rows) != 1:
            raise ImgsimError(f"{image} is not one indexed image" if rows else f"no image with id {image} in this index")
        row = rows[0]
        vector = self._store.vectors_by_id([row.id], self._manifest.dim).get(row.id)
        if vector is None or damaged_rows(vector[None])[0]:
            raise IndexCorruptError(f"the stored vector of {row.path} (id {row.id}) is "
                                    f"{'missing' if vector is None else 'damaged'}: `imgsim verify --repair` removes "
                                    f"such entries, and the next `imgsim index` embeds their files again")
        results = self._search_vector(vector, k + 1, filter=filter, min_score=min_score, exact=exact, ef=ef,
                                      query=row.path, skip=row.id, expand=expand)
        return results[:k]

    @_guard_database
    def why_empty(self, filter: Filter | None = None, min_score: float | None = None) -> str | None:
        """Why a search (or a listing) with this filter and `min_score` can have found nothing: the
        index is empty, no image matches the filter, or none scored that much; None if none of these."""
        if len(self) == 0:
            return "the index is empty (add pictures with `imgsim index FOLDER`)"
        if filter is not None and not filter.empty and next(iter(self.images(filter, limit=1)), None) is None:
            return "no indexed image matches the filter"
        if min_score is not None:
            return f"no result scores at least {min_score}"
        return None

    def _allowed(self, filter: Filter | None) -> np.ndarray | None:
        """The ids a filter lets through (None: no filter)."""
        if filter is None or filter.empty:
            return None
        where, params = filter.where()
        return self._store.ids_where(where, params)

    def _search_vector(self, vector: np.ndarray, k: int, *, filter: Filter | None, min_score: float | None,
                       exact: bool, ef: int | None, query: str | None, skip: int | None = None,
                       expand: bool | expansion.Expansion = False,
                       allowed: np.ndarray | None = None) -> list[SearchResult]:
        """One query vector's results; `allowed`, where given instead of `filter`, is `_allowed(filter)`."""
        if k < 1:
            raise ImgsimError("k must be at least 1")
        if ef is not None and not 1 <= ef <= 4096:
            raise ImgsimError("ef must be between 1 and 4096")
        if min_score is not None and not np.isfinite(min_score):
            raise ImgsimError(f"min_score must be a number, not {min_score}")
        if filter is not None:
            allowed = self._allowed(filter)
        how = expansion.resolve(expand)
        if how is not None:  # ranked for the query and its best match; the scores stay the query's own
            scores, ids = expansion.search(self.graph, np.asarray(vector, dtype=np.float32), k, how, allowed=allowed,
                                           ef=ef, exact=exact, skip=skip)
        else:
            scores, ids = self.graph.search(np.asarray(vector, dtype=np.float32), k, allowed=allowed, ef=ef,
                                            exact=exact)
            if skip is not None:
                keep = ids != skip
                scores, ids = scores[keep], ids[keep]
        if min_score is not None:  # against the score as shown (6 decimals), so a shown score passes its own cut
            keep = np.round(scores, 6) >= min_score
            scores, ids = scores[keep], ids[keep]
        return self._results(scores, ids, query)

    def _results(self, scores: np.ndarray, ids: np.ndarray, query: str | None) -> list[SearchResult]:
        rows = self._store.result_rows(ids.tolist())
        root = os.fspath(self.root) if self.root is not None else None  # as `resolve`, without a Path per result
        results = []
        for score, row_id in zip(scores.tolist(), ids.tolist()):
            found = rows.get(row_id)
            if found is None:
                continue  # removed since the graph was loaded
            path = found.path
            abspath = path if root is None or os.path.isabs(path) else os.path.join(root, path)
            results.append(SearchResult(len(results) + 1, row_id, path, round(score, 6), found.width, found.height,
                                        found.format, found.size, query, abspath, found.date, found.labels))
        return results

    # -- browsing --------------------------------------------------------------------------------
    @_guard_database
    def images(self, filter: Filter | None = None, *, order: str = "path", limit: int | None = None) -> Iterator[dict]:
        """What is indexed (optionally filtered), one dict per image: its row, labels and `abspath`."""
        where, params = (filter or Filter()).where()
        batch: list[ImageRow] = []
        for row in self._store.rows_where(where, params, order=order, limit=limit):
            batch.append(row)
            if len(batch) >= 500:
                yield from self._records(batch)
                batch = []
        yield from self._records(batch)

    @_guard_database
    def images_by_id(self, ids: Iterable[int]) -> list[dict]:
        """The `images` records of these ids (those still indexed), in the order given."""
        ids = [int(i) for i in ids]
        rows = self._store.rows_by_id(ids)
        return self._records([rows[i] for i in ids if i in rows])

    def _records(self, rows: list[ImageRow]) -> list[dict]:
        labels = self._store.labels_by_id([row.id for row in rows])
        records = []
        for row in rows:
            data = row.to_dict()
            data["labels"] = labels.get(row.id, [])
            data["abspath"] = str(self.resolve(row.path))
            records.append(data)
        return records

    # -- duplicates ------------------------------------------------------------------------------
    @_guard_database
    def duplicates(self, *, threshold: float | None = None, filter: Filter | None = None,
                   reference: Iterable[str] = (), against_reference: bool = False, min_size: int = 0,
                   on_progress: ProgressFn | None = None) -> list:
        """Groups of duplicate and near-duplicate images (`DupeGroup`s, largest first); see `dupes.py`.
        `reference` folders hold originals: always keepers, never moved."""
        from .dupes import find_duplicates

        return find_duplicates(self, threshold=threshold, filter=filter,
                               reference=reference, against_reference=against_reference, min_size=min_size,
                               on_progress=on_progress)

    @property
    def dupes_threshold(self) -> float:
        """The default duplicate threshold for this index's model (`defaults.MODEL_THRESHOLDS`)."""
        return dupes_threshold(self.manifest.model)

    @_guard_database
    def forget_files(self, paths: Iterable[str | os.PathLike]) -> int:
        """Remove the entries of these files (moved away by the caller) from the index."""
        self._writable()
        rows = [self._store.row_by_path(self._key(Path(os.path.abspath(p)))) for p in paths]
        ids = [row.id for row in rows if row is not None]
        with self._store.transaction():
            self._store.delete(ids)
        self.graph.forget_removed()
        return len(ids)

    @_guard_database
    def rows(self) -> Iterator[ImageRow]:
        yield from self._store.all_rows()

    # -- reporting -------------------------------------------------------------------------------
    @_guard_database
    def info(self) -> dict:
        """What a user wants to know about an index, as plain data."""
        m = self._manifest
        count = len(self)
        faiss_bytes = self.faiss_path.stat().st_size if self.faiss_path.exists() else 0
        sqlite_bytes = self.sqlite_path.stat().st_size
        return {
            "count": count,
            "model": m.model,
            "model_sha256": m.model_sha256,
            "dimensions": m.dim,
            "metric": m.metric,
            "preprocess": m.preprocess.to_dict(),
            "pooling": m.pooling,
            "dupes_threshold": self.dupes_threshold,
            "hnsw": m.hnsw.to_dict(),
            "graph_size": len(self.graph),
            "graph_dead": self.graph.dead_count,
            "graph_dim": self.graph.code_dim,
            "centred": self.graph.centred,
            "root": str(self.root) if self.root else None,
            "faiss_file": str(self.faiss_path),
            "faiss_bytes": faiss_bytes,
            "sqlite_file": str(self.sqlite_path),
            "sqlite_bytes": sqlite_bytes,
            "bytes_per_image": round((faiss_bytes + sqlite_bytes) / count) if count else 0,
            "errors": len(self._store.errors()),
            "format_version": m.format_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(m.created)) if m.created else None,
        }

    @_guard_database
    def verify(self, repair: bool = False):
        """Check every invariant of the index; with `repair`, fix what SQLite allows. Returns a `VerifyReport`."""
        from .verify import verify

        return verify(self, repair=repair)

    @_guard_database
    def errors(self) -> list[tuple[str, str, float]]:
        """(path, reason, when) for each file that failed to index and has not been indexed since."""
        return self._store.errors()

    @property
    def store(self) -> Store:
        """The SQLite side (for `verify` and exporters; most callers want the methods above)."""
        return self._store

    # -- one image by id (used by `imgsim serve`) ------------------------------------------------
    @_guard_database
    def image(self, image_id: int) -> ImageRow | None:
        """What the index holds about the image with this id (a `SearchResult.id`), or None."""
        return self._store.rows_by_id([image_id]).get(image_id)

    @_guard_database
    def vector(self, image_id: int) -> np.ndarray | None:
        """The stored embedding of the image with this id, or None: search with it to find the
        images similar to an indexed one without decoding or embedding it again."""
        return self._store.vectors_by_id([image_id], self._manifest.dim).get(image_id)
