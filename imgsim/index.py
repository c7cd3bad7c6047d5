"""`Index`: the one object users hold. It ties the SQLite store, the FAISS file and a model together.

An index is one name on disk: ``NAME.sqlite`` (rows, vectors, manifest; the source of truth) and
``NAME.faiss`` (the HNSW graph, derived). Image paths are stored relative to the index's root folder,
and the root relative to the index files, so a folder moved together with its index keeps working.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import images as imgs
from .ann import AnnIndex, HnswParams
from .errors import ImageError, ImgsimError, IndexCorruptError, IndexNotFoundError, ModelError, ReadOnlyIndexError
from .files import discard, leftover_stages, publish
from .lock import WriterLock
from .images import Preprocess
from .models import Model, default_model, normalize, parse_pooling, spec_for
from .pipeline import embed_files
from .store import FORMAT_VERSION, NewImage, Store
from .sync import Plan, is_under, plan_sync

log = logging.getLogger("imgsim")

ProgressFn = Callable[[int, int], None]
SkipFn = Callable[[str, str], None]

REBUILD_DEAD_FRACTION = 0.2
"""Rebuild the FAISS graph once this share of its entries belong to removed images."""

CENTER_MIN_IMAGES = 200
"""From this many images on, scores are cosine after subtracting the collection's mean vector
(taken from the graph at each save), which scripts/eval_retrieval.py measured as better for both near-duplicates
and categories. Below it the mean says too little about the collection and plain cosine is used."""

RERANK_CANDIDATES = 100
"""With a mean, the HNSW graph (plain cosine) proposes this many candidates, re-scored exactly."""


def index_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The (FAISS, SQLite) file pair for an index name; a name ending in either suffix also works."""
    base = Path(path)
    if base.suffix in (".faiss", ".sqlite"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".faiss"), base.with_name(base.name + ".sqlite")


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


@dataclass(frozen=True)
class SearchResult:
    """One neighbour of a query. `score` is cosine similarity: 1.0 is identical, higher is closer."""

    rank: int
    id: int
    path: str
    score: float
    width: int
    height: int
    format: str
    size: int
    query: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SyncReport:
    """What an `add` or `sync` did. `failures` holds (path, reason) for each skipped file."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    embedded: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "failures"}
        data["seconds"] = round(self.seconds, 3)
        data["images_per_second"] = round(self.images_per_second, 1)
        return data


class Index:
    """An image similarity index. Use `Index.create` or `Index.open`, ideally as a context manager."""

    def __init__(self, base: Path, store: Store, root_override: str | os.PathLike | None = None,
                 lock: WriterLock | None = None):
        self.faiss_path, self.sqlite_path = index_files(base)
        self._store = store
        self._lock = lock
        self._manifest = store.manifest()
        self._root_override = Path(root_override).resolve() if root_override else None
        self._model: Model | None = None
        self._ann: AnnIndex | None = None
        self._ann_dirty = False

    # -- opening and closing ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, *, model: str | None = None, root: str | os.PathLike | None = None,
               hnsw: HnswParams | None = None) -> Index:
        """Create a new, empty index at `path` (files PATH.faiss and PATH.sqlite).

        `model` is a catalogue name (default: resnet50 when installed, else the bundled model);
        `root` is the folder image paths are stored relative to (default: the first folder added).
        """
        faiss_path, sqlite_path = index_files(path)
        if sqlite_path.exists():
            raise ImgsimError(f"an index already exists at {sqlite_path}: open it instead, or delete it first")
        if not sqlite_path.parent.is_dir():
            raise IndexNotFoundError(f"folder {sqlite_path.parent} does not exist")
        if model is None:
            model, why = default_model()
            log.info("model: %s (%s)", model, why)
        loaded = Model.load(model)
        # Built under a temporary name and linked into place whole, so a crash never leaves a half-made index.
        staging = sqlite_path.with_name(f".{sqlite_path.name}.{os.getpid()}.new")
        try:
            store = Store.create(staging)
            with store.transaction():
                store.set_manifest(
                    format_version=FORMAT_VERSION,
                    model=loaded.name,
                    model_sha256=loaded.sha256,
                    dim=loaded.dim,
                    metric="cosine",
                    preprocess=loaded.preprocess.to_dict(),
                    pooling=loaded.pooling,
                    hnsw=(hnsw or HnswParams()).to_dict(),
                    root=None if root is None else _relative(Path(root), sqlite_path.parent),
                    created=time.time(),
                    faiss_sha256=None,
                    faiss_previous_sha256=None,
                )
            store.close()
            _link_new(staging, sqlite_path)
        finally:
            for leftover in (staging, Path(f"{staging}-wal"), Path(f"{staging}-shm")):
                leftover.unlink(missing_ok=True)
        index = cls.open(path)
        index._model = loaded
        return index

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False, root: str | os.PathLike | None = None) -> Index:
        """Open an existing index. `read_only` allows no writes and needs no write access to its folder;
        `root` overrides where image files are looked for."""
        faiss_path, sqlite_path = index_files(path)
        if not sqlite_path.exists():
            raise IndexNotFoundError(f"no index at {path} ({sqlite_path.name} not found): "
                                     f"create one with `imgsim index FOLDER --index {path}`")
        lock = None if read_only else WriterLock.acquire(sqlite_path)
        try:
            store = Store.open(sqlite_path, read_only=read_only)
            index = cls(Path(path), store, root_override=root, lock=lock)
            index._check_manifest()
            if lock:  # the writer: remove FAISS files a killed writer staged but never renamed
                for leftover in leftover_stages(faiss_path):
                    discard(leftover)
        except BaseException:
            if lock:
                lock.release()
            raise
        return index

    def _check_manifest(self) -> None:
        m = self._manifest
        required = ("format_version", "model", "model_sha256", "dim", "preprocess", "hnsw")
        missing = [key for key in required if key not in m]
        if missing:
            raise IndexCorruptError(f"{self.sqlite_path} has no {', '.join(missing)} in its manifest")
        try:
            hnsw = HnswParams.from_dict(m["hnsw"])
            prep = Preprocess.from_dict(m["preprocess"])
            parse_pooling(m.get("pooling", "avg"))
            sane = 2 <= hnsw.M <= 256 and 1 <= hnsw.ef_construction <= 4096 and 1 <= hnsw.ef_search <= 4096
            sane = sane and isinstance(m["format_version"], int) and isinstance(m.get("root"), (str, type(None)))
            sane = sane and 16 <= prep.size <= 1024 and prep.size <= prep.resize_to <= 2048
            sane = sane and prep.resize in ("crop", "squash") and prep.interpolation in ("bilinear", "bicubic")
            center = m.get("center")
            sane = sane and (center is None or (isinstance(center, list) and len(center) == m["dim"]
                                                and np.isfinite(np.asarray(center, np.float64)).all()))
        except (KeyError, TypeError, ValueError, ModelError):
            sane = False
        if not sane:
            raise IndexCorruptError(f"{self.sqlite_path} has an invalid manifest")
        if m["format_version"] > FORMAT_VERSION:
            raise ImgsimError(f"{self.sqlite_path} was written by a newer imgsim (format {m['format_version']}): "
                              f"upgrade imgsim to read it")
        try:
            spec = spec_for(m["model"])
        except ModelError:
            raise ModelError(f"index {self.sqlite_path} was made with model {m['model']!r}, which this imgsim "
                             f"does not know: upgrade imgsim, or re-index with a known model") from None
        if spec.dim != m["dim"]:
            raise IndexCorruptError(f"{self.sqlite_path} says {m['model']} has {m['dim']} dimensions, not {spec.dim}")

    def close(self) -> None:
        """Write the FAISS file if it changed, and release the files."""
        if self._store is None:
            return
        try:
            if self._ann_dirty and not self.read_only:
                self._save_ann()
        finally:
            self._store.close()
            self._store = None
            if self._lock:
                self._lock.release()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties ------------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return self._store.read_only

    @property
    def model_name(self) -> str:
        return self._manifest["model"]

    @property
    def model(self) -> Model:
        """The model this index was made with, loaded and checked on first use."""
        if self._model is None:
            m = self._manifest
            self._model = Model.load(m["model"], expect_sha256=m["model_sha256"],
                                     preprocess=Preprocess.from_dict(m["preprocess"]), pooling=m.get("pooling", "avg"))
        return self._model

    @property
    def root(self) -> Path | None:
        if self._root_override is not None:
            return self._root_override
        stored = self._manifest.get("root")
        if stored is None:
            return None
        return (self.sqlite_path.parent / stored).resolve()

    def __len__(self) -> int:
        return len(self._store)

    def _set_root(self, folder: Path) -> None:
        relative = _relative(folder, self.sqlite_path.parent)
        with self._store.transaction():
            self._store.set_manifest(root=relative)
        self._manifest["root"] = relative

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

    def resolve(self, stored_path: str) -> Path:
        """The file a stored path refers to now."""
        path = Path(stored_path)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    # -- the FAISS side --------------------------------------------------------------------------
    @property
    def _hnsw(self) -> HnswParams:
        return HnswParams.from_dict(self._manifest["hnsw"])

    def _ann_index(self) -> AnnIndex:
        """The HNSW index, loaded on first use and brought up to date with SQLite if it lags."""
        if self._ann is None:
            self._ann = self._load_or_rebuild_ann()
            self._catch_up_ann()
        return self._ann

    def _load_or_rebuild_ann(self) -> AnnIndex:
        expected = tuple(filter(None, (self._manifest.get("faiss_sha256"), self._manifest.get("faiss_previous_sha256"))))
        if not expected and len(self._store) == 0:
            return AnnIndex.empty(self._manifest["dim"], self._hnsw)
        if expected and self.faiss_path.exists():
            try:
                return AnnIndex.load(self.faiss_path, expected, self._manifest["dim"], self._hnsw)
            except IndexCorruptError as e:
                log.warning("%s; rebuilding it from %s", e, self.sqlite_path.name)
        else:
            log.warning("%s is missing; rebuilding it from %s", self.faiss_path.name, self.sqlite_path.name)
        return self._build_ann()

    def _build_ann(self) -> AnnIndex:
        ann = AnnIndex.empty(self._manifest["dim"], self._hnsw)
        for ids, vectors in self._store.vectors(self._manifest["dim"]):
            ann.add(ids, vectors)
        self._ann_dirty = True
        return ann

    def _catch_up_ann(self) -> None:
        ann = self._ann
        caught_up = 0  # ids only grow and the graph only appends, so it lacks exactly the ids above its largest
        for ids, vectors in self._store.vectors(self._manifest["dim"], after_id=ann.max_id()):
            ann.add(ids, vectors)
            caught_up += len(ids)
        if caught_up:
            log.info("added %d vectors to %s that it was missing", caught_up, self.faiss_path.name)
            self._ann_dirty = True
        ann.set_dead(np.setdiff1d(ann.ids(), self._store.ids(), assume_unique=True))

    def _save_ann(self) -> None:
        ann = self._ann
        if ann.dead_count > REBUILD_DEAD_FRACTION * max(1, len(ann)):
            self._ann = ann = self._build_ann()
            ann.set_dead(np.empty(0, np.int64))
        # Staged, recorded, then renamed: a crash at any point leaves a file the manifest knows
        # (the previous one or the new one), so the next open never mistakes it for damage.
        staged, digest = ann.stage(self.faiss_path)
        mean = ann.mean() if len(self._store) >= CENTER_MIN_IMAGES else None
        update = {"faiss_sha256": digest, "faiss_previous_sha256": self._manifest.get("faiss_sha256"),
                  "center": None if mean is None else [float(v) for v in mean]}
        try:
            with self._store.transaction():
                self._store.set_manifest(**update)
            publish(staged, self.faiss_path)
        except BaseException:
            discard(staged)
            raise
        self._manifest.update(update)
        self._ann_dirty = False

    def rebuild(self) -> None:
        """Rebuild the FAISS file from the vectors in SQLite."""
        self._ann = self._build_ann()
        self._save_ann()

    # -- adding ----------------------------------------------------------------------------------
    def add(self, sources: str | os.PathLike | Iterable[str | os.PathLike], *, on_progress: ProgressFn | None = None,
            on_skip: SkipFn | None = None, batch_size: int = 16, max_pixels: int = imgs.DEFAULT_MAX_PIXELS) -> SyncReport:
        """Add image files and folders (walked recursively). Unchanged files are not embedded again,
        a moved file keeps its vector, and nothing is removed; see `sync` for that."""
        return self._update(sources, remove_missing=False, on_progress=on_progress, on_skip=on_skip,
                            batch_size=batch_size, max_pixels=max_pixels)

    def sync(self, folder: str | os.PathLike, *, remove_missing: bool = True, on_progress: ProgressFn | None = None,
             on_skip: SkipFn | None = None, batch_size: int = 16, max_pixels: int = imgs.DEFAULT_MAX_PIXELS) -> SyncReport:
        """Make the index match `folder`: embed new and changed files, follow moved ones and, unless
        `remove_missing` is false, remove entries for files under `folder` that are gone."""
        return self._update([folder], remove_missing=remove_missing, on_progress=on_progress, on_skip=on_skip,
                            batch_size=batch_size, max_pixels=max_pixels)

    def _update(self, sources, *, remove_missing: bool, on_progress, on_skip, batch_size: int,
                max_pixels: int) -> SyncReport:
        if self.read_only:
            raise ReadOnlyIndexError(f"{self.sqlite_path} is open read-only")
        started = time.perf_counter()
        sources = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
        for source in sources:
            if not source.exists() and not source.is_symlink():
                raise ImgsimError(f"{source} does not exist")
        if self.root is None:
            folders = [s for s in sources if s.is_dir()]
            self._set_root(folders[0] if folders else Path(os.path.commonpath([s.resolve().parent for s in sources])))
        report = SyncReport()
        unreadable: list[tuple[str, str]] = []
        files = list(imgs.expand(sources, on_error=lambda path, reason: unreadable.append((str(path), reason))))
        walked = [self._key(s.resolve()) for s in sources if s.is_dir()]
        plan = plan_sync(files, self._store, key=self._key, resolve=self.resolve,
                         walked_prefixes=walked if remove_missing else None,
                         unseen_prefixes=[self._key(Path(path).resolve()) for path, _ in unreadable])
        plan.failures[:0] = unreadable  # reported and counted; what was indexed under them is kept
        self._apply_plan(plan, report)
        stale = [p for p, _, _ in self._store.errors() if p in plan.seen or (remove_missing and is_under(p, walked))]
        with self._store.transaction():
            self._store.forget_errors(stale)  # they are tried again now, and recorded again if they fail
        self._embed_new(plan, report, on_progress, on_skip, batch_size, max_pixels)
        report.seconds = time.perf_counter() - started
        return report

    def _apply_plan(self, plan: Plan, report: SyncReport) -> None:
        """Write what needs no embedding: moves, touched files, copies of known images, removals."""
        ann = self._ann_index()  # loaded (and caught up) before new rows exist, so none is added twice
        with self._store.transaction():
            for row_id, key, size, mtime_ns in plan.moves:
                self._store.update_file(row_id, key, size, mtime_ns)
            for row_id, key, size, mtime_ns in plan.touched:
                self._store.update_file(row_id, key, size, mtime_ns)
            self._store.delete(plan.removals + plan.replaced)
            source_ids = [source_id for _, source_id in plan.copies]
            vectors = self._store.vectors_by_id(source_ids, self._manifest["dim"])
            sources = self._store.rows_by_id(source_ids)
            copies = []
            for item, source_id in plan.copies:
                if source_id not in vectors:  # its row went with this very plan (a replaced file)
                    plan.to_embed.append(item)
                    continue
                source = sources[source_id]
                copies.append(NewImage(item.key, item.size, item.mtime_ns, item.sha256, source.width, source.height,
                                       source.format, vectors[source_id]))
            new_ids = self._store.insert(copies)
        if copies:
            ann.add(np.asarray(new_ids), np.stack([c.vector for c in copies]))
        if plan.removals or plan.replaced or copies:
            ann.set_dead(np.setdiff1d(ann.ids(), self._store.ids(), assume_unique=True))
            self._ann_dirty = True
        report.moved = len(plan.moves)
        report.unchanged = plan.unchanged + len(plan.touched)
        report.removed = len(plan.removals)
        report.added = len(copies)

    def _embed_new(self, plan: Plan, report: SyncReport, on_progress, on_skip, batch_size: int,
                   max_pixels: int) -> None:
        if plan.failures:
            with self._store.transaction():
                self._record_failures(plan.failures, report, on_skip)
        if not plan.to_embed:
            return
        model = self.model
        ann = self._ann_index()
        replaced_keys = set(plan.replaced_keys)
        done = 0
        for batch, failures in embed_files(plan.to_embed, model, batch_size=batch_size, max_pixels=max_pixels):
            with self._store.transaction():
                new_ids = self._store.insert(batch)
                self._record_failures(failures, report, on_skip)
            if batch:
                ann.add(np.asarray(new_ids), np.stack([image.vector for image in batch]))
                self._ann_dirty = True
            for image in batch:
                if image.path in replaced_keys:
                    report.updated += 1
                else:
                    report.added += 1
            report.embedded += len(batch)
            done += len(batch) + len(failures)
            if on_progress:
                on_progress(done, len(plan.to_embed))
        self._save_ann()

    def _record_failures(self, failures: list[tuple[str, str]], report: SyncReport, on_skip: SkipFn | None) -> None:
        """Keep (path, reason) failures in the errors table (inside the caller's transaction), count
        them in `report`, and tell `on_skip`."""
        self._store.record_errors([(self._key(Path(path)), reason) for path, reason in failures])
        report.failed += len(failures)
        report.failures.extend(failures)
        for path, reason in failures:
            if on_skip:
                on_skip(path, reason)

    # -- searching -------------------------------------------------------------------------------
    def embed(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        """The normalised embedding of an image file or a PIL image, as this index's model sees it."""
        prep = self.model.preprocess
        if isinstance(image, Image.Image):
            array = imgs.to_array(imgs.to_rgb(image), prep)
        else:
            try:
                array, _ = imgs.load_array(image, prep)
            except ImageError as e:
                raise ImageError(f"cannot read query {image}: {e}") from None
        return self.model.embed(array[None])[0]

    def search(self, query: str | os.PathLike | Image.Image | np.ndarray, k: int = 10) -> list[SearchResult]:
        """The `k` indexed images closest to `query`: an image file, a PIL image, or a vector."""
        if k < 1:
            raise ImgsimError("k must be at least 1")
        name = os.fspath(query) if isinstance(query, (str, os.PathLike)) else None
        vector = query if isinstance(query, np.ndarray) else self.embed(query)
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self._manifest["dim"]:
            raise ImgsimError(f"query vector has {vector.shape[1]} dimensions; this index has {self._manifest['dim']}")
        center = self._manifest.get("center")
        if center is None:
            scores, ids = self._ann_index().search(vector, k)
            return self._results(scores[0], ids[0], name)
        _, ids = self._ann_index().search(vector, max(k, RERANK_CANDIDATES))
        scores, ids = self._centred_scores(vector[0], ids[0], np.asarray(center, np.float32))
        return self._results(scores[:k], ids[:k], name)

    def _centred_scores(self, query: np.ndarray, ids: np.ndarray, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarity after subtracting the collection's mean, best first."""
        stored = self._store.vectors_by_id(ids[ids >= 0].tolist(), len(center))
        if not stored:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        found = np.fromiter(stored, dtype=np.int64, count=len(stored))
        matrix = normalize(np.stack([stored[i] for i in found.tolist()]) - center)
        scores = matrix @ normalize((query - center)[None])[0]
        order = np.argsort(-scores, kind="stable")
        return scores[order], found[order]

    def _results(self, scores: np.ndarray, ids: np.ndarray, query: str | None) -> list[SearchResult]:
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        rows = self._store.rows_by_id(ids.tolist())
        results = []
        for score, row_id in zip(scores.tolist(), ids.tolist()):
            row = rows.get(row_id)
            if row is None:
                continue  # removed since the graph was loaded
            results.append(SearchResult(len(results) + 1, row.id, row.path, round(float(score), 6), row.width,
                                        row.height, row.format, row.size, query))
        return results

    # -- for imgsim.export (issue 11) -----------------------------------------------------------
    @property
    def store(self) -> Store:
        """The SQLite store, for imgsim.export, which reads every column generically. Internal: what it
        holds may change with the format; Python users want `search`, `rows` and `info`."""
        return self._store

    # -- reporting -------------------------------------------------------------------------------
    def info(self) -> dict:
        """What a user wants to know about an index, as plain data."""
        m = self._manifest
        count = len(self)
        faiss_bytes = self.faiss_path.stat().st_size if self.faiss_path.exists() else 0
        sqlite_bytes = self.sqlite_path.stat().st_size
        return {
            "count": count,
            "model": m["model"],
            "model_sha256": m["model_sha256"],
            "dimensions": m["dim"],
            "metric": m.get("metric", "cosine"),
            "preprocess": m["preprocess"],
            "hnsw": m["hnsw"],
            "root": str(self.root) if self.root else None,
            "faiss_file": str(self.faiss_path),
            "faiss_bytes": faiss_bytes,
            "sqlite_file": str(self.sqlite_path),
            "sqlite_bytes": sqlite_bytes,
            "bytes_per_image": round((faiss_bytes + sqlite_bytes) / count) if count else None,
            "errors": len(self._store.errors()),
            "format_version": m["format_version"],
            "created": m.get("created"),
        }

    def verify(self, repair: bool = False):
        """Check every invariant of the index; with `repair`, fix what SQLite allows. Returns a `VerifyReport`."""
        from .verify import verify

        return verify(self, repair=repair)

    def errors(self) -> list[tuple[str, str, float]]:
        """(path, reason, when) for each file that failed to index and has not been indexed since."""
        return self._store.errors()

    def rows(self) -> Iterator:
        return self._store.all_rows()
