"""A record, in the user's own cache folder, of FAISS files already proven sound.

Checking a graph file (its sha256 against the manifest, then its whole structure, see
`faiss_format`) means reading all of it: a gigabyte at a million images. It only needs doing once
per version of the file. After a check passes, `remember` writes a small record keyed by what
identifies that version on this machine: the real path, device, inode, size, and the modification
and change times to the nanosecond. `lookup` returns the checked sha256 only when all of them
still match.

Why this is safe: the record lives under the user's cache folder ($XDG_CACHE_HOME/imgsim or
~/.cache/imgsim; $IMGSIM_CACHE overrides it), which a shipped index cannot write to; a checksum kept
inside the index itself would prove nothing, since whoever crafts the file writes that too. Any
change to the file through the filesystem changes its change time (ctime), which no user can set;
writers replace the file by rename, which also changes the inode. A file changed within the clock
tick of its last check could keep the same times, so ("racily clean", as git calls it) a record is
only written for a file whose times are a few seconds in the past. Anything unexpected (no cache
folder, unreadable or malformed record) means "not checked", never an error. Recording a version
removes the records of that path's earlier versions, so the folder holds one small file per index.

Model files are recorded the same way (`file_sha256`), with their sha256 alone: hashing a model (13
MB for the bundled one, ~100 MB for ResNet50) at every start cost more than the rest of a search
but opening its graph. The record only stands in for reading the file; the sha256 it gives is
compared with the catalogue's and the index's as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

VERSION = 1
"""Bumped whenever `faiss_format` accepts something new: older records then no longer count."""

SETTLED_SECONDS = 3.0
"""Only files unchanged for this long get a record (timestamps can be as coarse as a clock tick)."""


def cache_dir() -> Path:
    override = os.environ.get("IMGSIM_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgsim" / "checked"


def _key(path: Path, st: os.stat_result, dim: int, kind: str = "faiss") -> dict:
    key = {"version": VERSION, "path": os.path.realpath(path), "dev": st.st_dev, "ino": st.st_ino,
           "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "dim": dim}
    if kind != "faiss":  # FAISS records keep the key they always had
        key["kind"] = kind
    return key


def _prefix(key: dict) -> str:
    return hashlib.sha256(key["path"].encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _record_path(key: dict) -> Path:
    """One file per checked version, named by its path's hash then the whole key's."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()
    return cache_dir() / f"{_prefix(key)}-{name[:32]}.json"


def lookup(path: Path, st: os.stat_result, dim: int, kind: str = "faiss") -> str | None:
    """The sha256 recorded when this exact file version passed its check, or None."""
    key = _key(path, st, dim, kind)
    try:
        record = json.loads(_record_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("sha256"), str):
        return None
    return record["sha256"]


def remember(path: Path, st: os.stat_result, dim: int, sha256: str, kind: str = "faiss") -> None:
    """Record that this file version (as `st` describes it) passed its check with this sha256."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
    if time.time() - newest < SETTLED_SECONDS:
        return
    key = _key(path, st, dim, kind)
    target = _record_path(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": sha256}))
        os.replace(tmp, target)
        for older in target.parent.glob(f"{_prefix(key)}-*.json"):  # earlier versions of the same file
            if older != target:
                older.unlink(missing_ok=True)
    except OSError:
        pass


def file_sha256(path: Path, kind: str) -> str:
    """The sha256 of the file at `path`: recorded for this very version of it, else read (through one
    descriptor, stat then contents, so a change made meanwhile gives the record a key that no
    longer matches) and recorded."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        known = lookup(path, st, 0, kind)
        if known is not None:
            return known
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    remember(path, st, 0, digest.hexdigest(), kind)
    return digest.hexdigest()
