"""Deciding what an `add` or `sync` must do, before any image is decoded.

A file whose size and mtime match its row is unchanged. Otherwise its content hash decides: the same
hash at the same path is a touched file (stat updated, nothing embedded); a new path whose hash
belongs to a row whose file is gone is a move (path updated, vector kept); a new path whose hash
belongs to a live row is a copy (vector reused); anything else is embedded. A file whose content
changed at the same path is embedded again, and its new row keeps the labels of the content it now
holds where another changed file held it (names swapped), else of the row it replaces.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .files import file_sha256
from .models import available_cpus
from .store import ImageRow, Store


@dataclass(frozen=True)
class Candidate:
    """A file that needs embedding (or can reuse the vector of identical content)."""

    path: Path
    key: str
    size: int
    mtime_ns: int
    sha256: str


StatUpdate = tuple[int, str, int, int]  # (row id, stored path, size, mtime_ns)


@dataclass
class Plan:
    unchanged: int = 0
    touched: list[StatUpdate] = field(default_factory=list)
    moves: list[StatUpdate] = field(default_factory=list)
    copies: list[tuple[Candidate, int]] = field(default_factory=list)
    to_embed: list[Candidate] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    replaced_keys: list[str] = field(default_factory=list)
    replaced_hashes: list[str] = field(default_factory=list)
    """Rows of files whose content changed at the same path (embedded again): their ids, stored paths
    and former content hashes (labels follow the content: `Index._labels_to_carry`)."""
    removals: list[int] = field(default_factory=list)
    kept: int = 0
    """Without removals (`remove_missing=False`): rows under the walked folders whose files were not
    seen there (gone or excluded) and did not move, kept as they are."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    known_failed: set[str] = field(default_factory=set)
    """Stored paths of files that failed before and are unchanged since: not tried again."""


def file_stat(st: os.stat_result) -> tuple[int, int, int]:
    """What says a file changed: size, mtime, and ctime (a chmod that makes it readable changes that)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def link_stat(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """The `file_stat` of a broken symbolic link itself (re-pointing it changes its ctime), so that an
    unchanged one is a known failure like any other; None for anything else."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return file_stat(st) if stat.S_ISLNK(st.st_mode) else None


def is_under(key: str, prefixes: list[str]) -> bool:
    for prefix in prefixes:
        if prefix == ".":
            if not key.startswith("/"):
                return True
        elif key == prefix or key.startswith(prefix.rstrip("/") + "/"):
            return True
    return False


def plan_sync(files: Iterable[Path], store: Store, *, key: Callable[[Path], str], resolve: Callable[[str], Path],
              walked_prefixes: list[str], unseen_prefixes: list[str] = (),
              known_failures: dict[str, tuple[int, int, int]] | None = None, remove_missing: bool = True) -> Plan:
    """Classify `files` against the stored rows. Rows under the stored-path prefixes `walked_prefixes`
    whose files were not seen are removals (or the sources of moves), except rows under
    `unseen_prefixes`: folders that could not be read, whose files may well still be there. With
    `remove_missing` false they are only counted (`Plan.kept`), and a row is the source of a move
    wherever its file is gone.
    A file in `known_failures` (stored path: `file_stat` when it failed) that is unchanged is left alone."""
    plan = Plan()
    rows = list(store.all_rows())
    by_key = {row.path: row for row in rows}
    by_hash: dict[str, list[ImageRow]] = defaultdict(list)
    for row in rows:
        by_hash[row.sha256].append(row)

    pending: list[tuple[Path, str, int, int, ImageRow | None]] = []
    seen = plan.seen
    for path in files:
        try:
            st = os.stat(path)
        except OSError as e:
            broken = os.path.islink(path) and e.errno == errno.ENOENT
            if broken and known_failures and known_failures.get(key(path)) == link_stat(path):
                plan.known_failed.add(key(path))
                continue
            reason = "broken symbolic link" if broken else (e.strerror or str(e))
            plan.failures.append((str(path), reason))
            continue
        if known_failures and known_failures.get(key(path)) == file_stat(st):
            plan.known_failed.add(key(path))
            continue
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device named like an image would block or never end
            plan.failures.append((str(path), "not a regular file"))
            continue
        k = key(path)
        if k in seen:
            continue
        seen.add(k)
        row = by_key.get(k)
        if row is not None and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns:
            plan.unchanged += 1
        else:
            pending.append((path, k, st.st_size, st.st_mtime_ns, row))

    hashes = _hash_all([p[0] for p in pending])
    unseen = {row.id for row in rows if row.path not in seen and is_under(row.path, walked_prefixes)
              and not is_under(row.path, list(unseen_prefixes))}
    missing = unseen if remove_missing else None
    consumed: set[int] = set()

    def is_gone(row: ImageRow) -> bool:
        if row.id in consumed or row.path in seen:
            return False
        if missing is not None:
            return row.id in missing
        return not resolve(row.path).exists()

    for (path, k, size, mtime_ns, row), digest in zip(pending, hashes):
        if isinstance(digest, OSError):
            plan.failures.append((str(path), digest.strerror or str(digest)))
            continue
        if row is not None:
            if row.sha256 == digest:
                plan.touched.append((row.id, k, size, mtime_ns))
            else:
                plan.replaced.append(row.id)
                plan.replaced_keys.append(k)
                plan.replaced_hashes.append(row.sha256)
                plan.to_embed.append(Candidate(path, k, size, mtime_ns, digest))
            continue
        same = [r for r in by_hash.get(digest, ()) if r.id not in consumed]
        gone = next((r for r in same if is_gone(r)), None)
        if gone is not None:
            consumed.add(gone.id)
            plan.moves.append((gone.id, k, size, mtime_ns))
        elif same:
            plan.copies.append((Candidate(path, k, size, mtime_ns, digest), same[0].id))
        else:
            plan.to_embed.append(Candidate(path, k, size, mtime_ns, digest))
    if missing is not None:
        plan.removals = sorted(missing - consumed)
    else:
        plan.kept = len(unseen - consumed)
    return plan


def _hash_all(paths: list[Path]) -> list[str | OSError]:
    def one(path: Path) -> str | OSError:
        try:
            return file_sha256(path)
        except OSError as e:
            return e

    if len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=available_cpus()) as pool:
        return list(pool.map(one, paths))
