"""`imgsim verify`: check every invariant an index relies on, and say what was found.

The checks, cheapest first: SQLite's own integrity check; every row has a vector and every vector a
row; every vector has the right size, is finite and unit-length (and so are the crop views of an
index that has them); the FAISS file matches its manifest,
holds every live id, and its dead ids are accounted for; the model file is installed and is the one
the index was made with; the image files are where the index says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ImgsimError
from .models import Model
from .scoring import damaged_rows


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
    store = index.store
    sqlite_problems = store.integrity_problems()
    report.problems.extend(sqlite_problems)
    if repair and any("no image row" in p or "no vector" in p for p in sqlite_problems):
        removed = store.delete_unpaired()
        report.repaired.append(f"removed {removed} unpaired rows and vectors (re-index to embed those files again)")
        report.problems = [p for p in report.problems if "no image row" not in p and "no vector" not in p]
    _check_vectors(index, report, repair)
    _check_crop_views(index, report, repair)
    _check_faiss(index, report, repair)
    _check_model(index, report)
    _check_files(index, report)
    return report


def _check_vectors(index, report: VerifyReport, repair: bool) -> None:
    """Every stored vector a finite unit vector. With `repair`, the rows of damaged ones are
    removed, so that the next `imgsim index` embeds their files again (their labels go with them)."""
    store = index.store
    wrong_size = store.ids_with_wrong_size_vectors(index.manifest.dim)
    bad: list[np.ndarray] = [wrong_size]
    if not len(wrong_size):
        chunks = store.vectors(index.manifest.dim)
    else:  # read around them
        rest = np.setdiff1d(store.ids(), wrong_size)
        chunks = (store.vector_matrix(rest[at:at + 8192], index.manifest.dim) for at in range(0, len(rest), 8192))
    for ids, vectors in chunks:
        bad.append(ids[damaged_rows(vectors)])
    bad_ids = np.concatenate(bad)
    if not len(bad_ids):
        return
    if repair and not index.read_only:
        with store.transaction():
            store.delete(bad_ids.tolist())
        index.graph.forget_removed()
        report.repaired.append(f"removed {len(bad_ids)} image{'s' * (len(bad_ids) != 1)} whose stored vectors were "
                               f"damaged: the next `imgsim index` embeds their files again")
    else:
        what = f"have the wrong size ({len(wrong_size)} of them)" if len(wrong_size) else "are not finite unit vectors"
        report.problems.append(f"{len(bad_ids)} stored vectors {what} "
                               f"(verify --repair removes them, for `imgsim index` to embed their files again)")


def _check_crop_views(index, report: VerifyReport, repair: bool) -> None:
    """In an index with crop views (`imgsim index --centre-view`), every image has them, as finite
    unit vectors (a search passes over damaged ones, scoring that image by its own vector alone).
    With `repair`, such images are removed, so that the next `imgsim index` embeds them again."""
    views = len(index.manifest.preprocess.crop_views)
    stray = index.store.stray_crop_rows(views) if index.store.has_table("crop_vectors") else 0
    if stray and repair and not index.read_only:
        index.store.delete_stray_crop_rows(views)
        report.repaired.append(f"removed {stray} crop-view rows that belonged to no image")
    elif stray:
        report.problems.append(f"{stray} crop-view rows belong to no image (verify --repair removes them)")
    if not views:
        return
    bad = index.store.ids_with_damaged_crop_views(views, index.manifest.dim, index.manifest.preprocess.crop_code)
    if not len(bad):
        return
    if repair and not index.read_only:
        with index.store.transaction():
            index.store.delete(bad.tolist())
        index.graph.forget_removed()
        report.repaired.append(f"removed {len(bad)} image{'s' * (len(bad) != 1)} whose crop views were missing or "
                               f"damaged: the next `imgsim index` embeds their files again")
    else:
        report.problems.append(f"{len(bad)} images' crop views are missing or damaged (verify --repair removes "
                               f"those images, for `imgsim index` to embed their files again)")


def _check_faiss(index, report: VerifyReport, repair: bool) -> None:
    name = index.faiss_path.name
    found = index.graph.check_file()
    fixable = repair and not index.read_only
    problem = found.problem
    if found.duplicate_ids:
        problem = f"{name} holds some ids twice"
    if problem is not None:
        if fixable:
            index.rebuild()
            report.repaired.append(f"rebuilt {name} from the stored vectors ({problem})")
        else:
            report.problems.append(problem + " (verify --repair rebuilds it)")
        return
    if (found.missing or found.lagging) and fixable:
        index.graph.ann  # rebuilt or caught up from SQLite as it loads
        index.graph.save()
        what = "missing" if found.missing else f"lacked {found.lagging} stored vectors"
        report.repaired.append(f"wrote {name} from the stored vectors (it was {what})")
    elif (found.missing or found.lagging) and index.read_only and index.store.writer_active():
        report.notes.append(f"{name} is {'not written yet' if found.missing else 'behind'}: another process is "
                            f"indexing, and writes it when it finishes")
    elif found.missing:
        report.notes.append(f"{name} is missing (an interrupted first run, or deleted): searches rebuild it in "
                            f"memory each time until `imgsim verify --repair` or the next `imgsim index` writes it")
    elif found.lagging:
        report.notes.append(f"{name} lacks {found.lagging} of the {len(index)} stored vectors "
                            f"(an interrupted run): they are added when the index is next used")
    if found.dead:
        report.notes.append(f"{found.dead} removed images still in the graph (excluded from results; "
                            f"`imgsim rebuild` drops them)")


def _check_model(index, report: VerifyReport) -> None:
    try:
        Model.load(index.model_name, expect_sha256=index.manifest.model_sha256)
    except ImgsimError as e:
        report.notes.append(f"cannot search on this machine: {e}")


def _check_files(index, report: VerifyReport) -> None:
    missing = sum(1 for row in index.rows() if not index.resolve(row.path).is_file())
    if missing:
        report.notes.append(f"{missing} indexed file{'s are' if missing != 1 else ' is'} not on disk under {index.root} "
                            f"(moved away, or the index was shipped without them)")
