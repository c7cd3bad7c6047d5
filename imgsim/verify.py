"""`imgsim verify`: check every invariant an index relies on, and say what was found.

The checks, cheapest first: SQLite's own integrity check; every row has a vector and every vector a
row; every vector has the right size, is finite and unit-length; the FAISS file matches its manifest,
holds every live id, and its dead ids are accounted for; the model file is installed and is the one
the index was made with; the image files are where the index says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ImgsimError, IndexCorruptError
from .models import Model


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "repaired": self.repaired}


def verify(index, repair: bool = False) -> VerifyReport:
    """Check `index` (an open `Index`); with `repair`, fix what can be fixed from SQLite."""
    report = VerifyReport()
    store = index._store
    sqlite_problems = store.integrity_problems()
    report.problems.extend(sqlite_problems)
    if repair and any("no image row" in p or "no vector" in p for p in sqlite_problems):
        removed = store.delete_unpaired()
        report.repaired.append(f"removed {removed} unpaired rows and vectors (re-index to embed those files again)")
        report.problems = [p for p in report.problems if "no image row" not in p and "no vector" not in p]
    _check_vectors(index, report)
    _check_faiss(index, report, repair)
    _check_model(index, report)
    _check_files(index, report)
    return report


def _check_vectors(index, report: VerifyReport) -> None:
    dim = index._manifest["dim"]
    bad = 0
    try:
        for _, vectors in index._store.vectors(dim):
            norms = np.linalg.norm(vectors, axis=1)
            bad += int(np.count_nonzero(~np.isfinite(norms) | (np.abs(norms - 1) > 1e-3)))
    except IndexCorruptError as e:
        report.problems.append(str(e))
        return
    if bad:
        report.problems.append(f"{bad} stored vectors are not finite unit vectors")


def _check_faiss(index, report: VerifyReport, repair: bool) -> None:
    from .ann import AnnIndex, HnswParams

    manifest = index._manifest
    problem = None
    if not index.faiss_path.exists():
        if len(index):
            report.notes.append(f"{index.faiss_path.name} is missing: it is rebuilt from SQLite when next used")
    else:
        try:
            known = tuple(filter(None, (manifest.get("faiss_sha256"), manifest.get("faiss_previous_sha256"))))
            ann = AnnIndex.load(index.faiss_path, known,
                                manifest["dim"], HnswParams.from_dict(manifest["hnsw"]))
        except IndexCorruptError as e:
            problem = str(e)
        else:
            graph_ids = ann.ids()
            live = index._store.ids()
            lagging = np.setdiff1d(live, graph_ids)
            dead = np.setdiff1d(graph_ids, live)
            if len(lagging):
                report.notes.append(f"{index.faiss_path.name} lacks {len(lagging)} of the {len(live)} stored vectors "
                                    f"(an interrupted run): they are added when the index is next used")
            if len(np.unique(graph_ids)) != len(graph_ids):
                problem = f"{index.faiss_path.name} holds some ids twice"
            if len(dead):
                report.notes.append(f"{len(dead)} removed images still in the graph (excluded from results; "
                                    f"`imgsim rebuild` drops them)")
    if problem is None:
        return
    if repair and not index.read_only:
        index.rebuild()
        report.repaired.append(f"rebuilt {index.faiss_path.name} from the stored vectors ({problem})")
    else:
        report.problems.append(problem + " (verify --repair rebuilds it)")


def _check_model(index, report: VerifyReport) -> None:
    try:
        Model.load(index.model_name, expect_sha256=index._manifest["model_sha256"])
    except ImgsimError as e:
        report.notes.append(f"cannot search on this machine: {e}")


def _check_files(index, report: VerifyReport) -> None:
    missing = sum(1 for row in index.rows() if not index.resolve(row.path).is_file())
    if missing:
        report.notes.append(f"{missing} indexed files are not on disk under {index.root} "
                            f"(moved away, or the index was shipped without them)")
