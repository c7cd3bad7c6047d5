"""The `imgsim` command line: each command parses, calls `Index`, and formats. Results go to stdout,
progress and notices to stderr; `--json` prints one JSON object per line, `--csv` CSV."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .defaults import DEFAULT_MAX_PIXELS, THRESHOLDS_SAID
from .errors import ImgsimError
from .filters import Filter
from .output import Printer, format_option, shown

if TYPE_CHECKING:
    from .index import SearchResult, SyncReport

# Each command imports `Index` (numpy, Pillow, SQLite) when it runs, and FAISS and onnxruntime load
# only when the graph or the model is first used: `imgsim --help` and `imgsim list` start in a
# fraction of the time `imgsim search` needs (tests/test_cold_start.py checks what each loads).

DEFAULT_INDEX = "imgsim"
INDEX_HELP = "Index name: NAME.faiss and NAME.sqlite. Default: $IMGSIM_INDEX, else ./imgsim."


class ImgsimGroup(click.Group):
    """Turns every `ImgsimError` into a one-line `Error: ...` and exit code 1, and Ctrl-C into exit
    code 130 (128 + SIGINT, the shell's convention), in one place."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ImgsimError as e:  # one line, whatever a path in it holds (a newline in a file name)
            raise click.ClickException(shown(str(e))) from None
        except sqlite3.DatabaseError as e:  # met where no method expected it: damage, or locked, or I/O
            if isinstance(e, sqlite3.OperationalError) and "malformed" not in str(e):
                raise click.ClickException(f"the index database could not be read: {e}") from None
            raise click.ClickException(f"an index database is damaged: {e}; run `imgsim verify`") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None


def index_option(f):
    return click.option("--index", "index_path", envvar="IMGSIM_INDEX", default=DEFAULT_INDEX,
                        show_envvar=True, metavar="PATH", help=INDEX_HELP)(f)


def root_option(f):
    return click.option("--root", type=click.Path(file_okay=False), default=None,
                        help="Where the indexed images are now, if not where the index says.")(f)


def quiet_option(f):
    """-q on each command as well as before it: only results and errors."""

    def set_quiet(ctx, _param, value):
        if value:
            _configure_logging(quiet=True)
            ctx.ensure_object(dict)["quiet"] = True
        return value

    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=set_quiet,
                        help="Print only results and errors.")(f)


def filter_options(f):
    """The metadata filters, the same for search, similar, list and dupes."""
    options = [
        click.option("--folder", multiple=True, metavar="DIR", help="Only images under this folder (relative to "
                     "the index root). Repeat for several."),
        click.option("--label", multiple=True, help="Only images with this label. Repeat for several."),
        click.option("--format", "formats", multiple=True, metavar="FMT", help="Only this format (jpeg, png, webp...)."),
        click.option("--min-width", type=click.IntRange(0), help="Only images at least this wide (pixels)."),
        click.option("--min-height", type=click.IntRange(0), help="Only images at least this high (pixels)."),
        click.option("--since", metavar="DATE", help="Only images taken (EXIF, else file time) on or after DATE "
                     "(2024, 2024-06, 2024-06-30...)."),
        click.option("--until", metavar="DATE", help="Only images taken on or before DATE."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_filter(kwargs: dict, index) -> Filter:
    """The filter options as a `Filter`; a `--folder` may be given as a folder on disk (see `Index.folder_key`).
    A value the filter refuses (a date that does not exist, an unknown format) is a usage error (exit 2)."""
    try:
        return Filter(folders=tuple(index.folder_key(f) for f in kwargs.pop("folder")), labels=kwargs.pop("label"),
                      formats=kwargs.pop("formats"), min_width=kwargs.pop("min_width"),
                      min_height=kwargs.pop("min_height"), since=kwargs.pop("since"), until=kwargs.pop("until"))
    except ImgsimError as e:
        raise click.UsageError(str(e)) from None


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number", ctx, param)
    return value


def search_options(f):
    f = click.option("--ef", type=click.IntRange(1, 4096), help="HNSW search depth (default: the index's).")(f)
    f = click.option("--no-expand", "expand", flag_value=False, default=True,
                     help="Rank by the query alone, not with its best match too (scores are the query's "
                          "own either way).")(f)
    f = click.option("--exact", is_flag=True, help="Compare with every image instead of walking the graph.")(f)
    f = click.option("--min-score", type=click.FloatRange(-1.0, 1.0), callback=_finite,
                     help="Leave out results scoring below this (a cosine, -1 to 1).")(f)
    f = click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Results per query.")(f)
    return filter_options(f)


def _html_target(ctx, param, value):
    """The page's folder must be there before the work starts, not only when the page is written."""
    if value is not None:
        folder = Path(os.path.abspath(value)).parent
        if not folder.is_dir():
            raise click.BadParameter(f"cannot write {value}: the folder {folder} does not exist", ctx, param)
    return value


def html_option(f):
    return click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True), callback=_html_target,
                        help="Also write a self-contained web page with thumbnails to this file.")(f)


def warn(message: str) -> None:
    if not click.get_current_context().find_root().obj.get("quiet"):
        click.echo(message, err=True)


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("imgsim: %(message)s"))
    logger = logging.getLogger("imgsim")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


@click.group(cls=ImgsimGroup)
@click.version_option(package_name="imgsim")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors (also accepted after the command).")
@click.pass_context
def cli(ctx, quiet):
    """Find similar and duplicate images, offline: index a folder, then search it."""
    ctx.obj = {"quiet": quiet}
    _configure_logging(quiet)


@contextmanager
def progress_bar(label: str):
    """A callback `(done, total)` that draws a bar on stderr once there is something to show."""
    state = {}
    quiet = click.get_current_context().find_root().obj.get("quiet")

    def update(done: int, total: int) -> None:
        if quiet:
            return
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


@cli.command("index")
@click.argument("folder", type=click.Path(path_type=str))
@index_option
@click.option("--model", default=None, help="Model for a new index (see `imgsim models`). Default: resnet50 if "
              "installed, else efficientnet-lite0-lw (bundled).")
@click.option("--keep-missing", is_flag=True, help="Keep entries whose files are gone from FOLDER.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files and folders matching this pattern "
              "(relative path or name, e.g. '*.gif' or 'raw/*'). Repeat for several.")
@click.option("--label-from-folder", is_flag=True, help="Label each new image with its folder's name.")
@click.option("--centre-view/--no-centre-view", default=None, help="New index: by default it keeps a "
              "vector of each picture's centre 60% in grey, seen sharp and blurred, which searches score their "
              "best candidates by (finds tight crops, grey or not, blurred or not; each picture embedded 3 "
              "times, once at 160 px; 322 bytes an image). "
              "--centre-view keeps the centre 70% and 50% instead (more of the tightest crops, fewer blurred "
              "ones; embedded 3 times); "
              "--no-centre-view none (indexes ~1.8x as fast).")
@click.option("--retry-failed", is_flag=True, help="Try again the files that failed before, even if unchanged.")
@click.option("--strict", is_flag=True, help="Exit with code 3 if any file could not be indexed.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(1),
              help="Skip images whose header claims more pixels (decompression bombs).")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@quiet_option
def index_cmd(folder, index_path, model, keep_missing, exclude, label_from_folder, centre_view, retry_failed, strict,
              batch_size, max_pixels, as_json):
    """Index the images in FOLDER (recursively), creating the index or bringing it up to date.

    Only new and changed files are embedded; moved files keep their vectors; entries for files
    that are gone from FOLDER (or excluded) are removed unless --keep-missing. Files that failed
    before and are unchanged are counted as known failures, not tried again (see `imgsim errors`).
    """
    from .index import Index

    if not Path(folder).is_dir():
        raise click.ClickException(
            f"{folder} is a file: `imgsim index` takes the folder the pictures are in (and keeps it in step "
            f"with it); to add single files, use Python's Index.add" if Path(folder).exists()
            else f"image folder {folder} does not exist")
    from .crops import CROP_VIEWS

    # None: whatever an existing index was made with (a new one: crops.DEFAULT_CROP_VIEWS)
    views = None if centre_view is None else CROP_VIEWS if centre_view else ()
    with Index.open_or_create(index_path, model=model, root=folder, crop_views=views) as index, \
            progress_bar("embedding") as on_progress:
        report = index.sync(folder, remove_missing=not keep_missing, on_progress=on_progress,
                            on_skip=lambda path, reason: warn(f"skipped {shown(path)}: {reason}"),
                            batch_size=batch_size, max_pixels=max_pixels, exclude=exclude,
                            label_from_folder=label_from_folder, retry_failed=retry_failed)
        if not report.files_seen:  # a new index with nothing in it is not kept: its root would be this folder
            index.close(discard_if_fresh=True)
            made = index.sqlite_path.exists()
    if as_json:
        Printer("json")(report.to_dict())
    else:
        click.echo(summary_line(report))
    if not report.files_seen:
        warn(f"no image files in {shown(folder)} (JPEG, PNG, WebP, GIF, TIFF, BMP, HEIC...; see `imgsim index --help`)"
             + ("" if made else "; no index was made"))
    if strict and (report.failed or report.known_failures):
        sys.exit(3)


def summary_line(report: SyncReport) -> str:
    known = f", known failures {report.known_failures}" if report.known_failures else ""
    ignored = f", ignored {report.unsupported} unsupported" if report.unsupported else ""
    kept = f", kept {report.kept} missing" if report.kept else ""
    return (f"added {report.added}, updated {report.updated}, moved {report.moved}, removed {report.removed}{kept}, "
            f"unchanged {report.unchanged}, failed {report.failed}{known}{ignored} in {report.seconds:.1f} s"
            + (f" ({report.images_per_second:.1f} images/s)" if report.embedded else ""))


def result_line(r: dict) -> str:
    return f"{r['rank']:>3}  {r['score']:.4f}  {shown(r['abspath'])}"


def print_results(printer: Printer, query: str, results: list[SearchResult], many: bool) -> None:
    if many:
        printer.heading(f"{shown(query)}:")
    for result in results:
        printer(result.to_dict())


def explain_empty(index, query: str | None, found, filter: Filter, min_score: float | None = None) -> None:
    """Say on stderr why a search (or a listing: `query` None) found nothing (`found`: its results,
    or how many; not an error: the exit code stays 0)."""
    if found:
        return
    if reason := index.why_empty(filter, min_score):
        warn(f"{shown(query)}: {reason}" if query is not None else reason)


def result_options(f):
    """What every command that prints search results takes: the index, the search options and
    filters, --root, and the output formats."""
    for option in (quiet_option, format_option, html_option, root_option, search_options, index_option):
        f = option(f)
    return f


@cli.command()
@click.argument("queries", nargs=-1, required=True, metavar="QUERY...")
@result_options
def search(queries, index_path, k, min_score, exact, ef, expand, root, html_file, fmt, **filters):
    """Find the indexed images most similar to each QUERY: image files, or folders of them.

    Scores are cosine similarity: 1.0 is the same picture, higher is closer. Results are ranked for
    the query together with its best matches (the best stays first; --no-expand: by the query alone),
    and each score is the query's own, so it need not fall steadily down the list. A query that
    cannot be read is reported on stderr, the others are still searched, and the exit code is 1.
    """
    from .index import Index

    printer = Printer(fmt, line=result_line)
    failed = False
    pages = []
    with Index.open(index_path, read_only=True, root=root) as index:
        filter = make_filter(filters, index)
        outcomes = index.search_many(queries, k=k, filter=filter, min_score=min_score, exact=exact, ef=ef,
                                     expand=expand)
        many = len(queries) > 1 or any(Path(q).is_dir() for q in queries)
        for outcome in outcomes:
            if outcome.error:
                failed = True
                click.echo(f"Error: {shown(outcome.error)}", err=True)
                continue
            print_results(printer, outcome.query, outcome.results, many)
            explain_empty(index, outcome.query, outcome.results, filter, min_score)
            pages.append((outcome.query, outcome.results))
        if html_file:
            from .report import search_page

            search_page(html_file, index, pages)
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("image", metavar="PATH_OR_ID")
@result_options
def similar(image, index_path, k, min_score, exact, ef, expand, root, html_file, fmt, **filters):
    """Find the images most like one that is already indexed (its path or id), without embedding it again."""
    from .index import Index

    with Index.open(index_path, read_only=True, root=root) as index:
        filter = make_filter(filters, index)
        results = index.similar(image, k=k, filter=filter, min_score=min_score, exact=exact, ef=ef, expand=expand)
        print_results(Printer(fmt, line=result_line), image, results, many=False)
        explain_empty(index, image, results, filter, min_score)
        if html_file:
            from .report import search_page

            search_page(html_file, index, [(results[0].query if results else image, results)])


class ByteSize(click.ParamType):
    """A size in bytes: 2000000, 500KB, 2MB, 1.5GiB."""

    name = "size"
    _UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number):]
        try:
            size = float(number) * self._UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size such as 500KB or 2MB", param, ctx)
        if size < 0:
            self.fail("a size cannot be negative", param, ctx)
        return int(size)


def dupe_line(group) -> str:
    others = ", ".join(f"{shown(m['abspath'])} ({'identical' if same else f'{score:.3f}'})"
                       for m, score, same in zip(group.members[1:], group.scores[1:], group.identical[1:]))
    return f"{len(group.members)}  keep {shown(group.keeper['abspath'])}  ~  {others}"


@cli.command()
@index_option
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None,
              help=f"Pairs scoring at least this are duplicates (default: {THRESHOLDS_SAID}; `imgsim info` says "
              "which; measured: see the README).")
@click.option("--min-size", type=ByteSize(), default=0, help="Ignore files smaller than this (e.g. 20KB).")
@click.option("--reference", multiple=True, metavar="DIR", help="A folder of originals (relative to the index "
              "root): its files are always the keeper and never moved. Repeat for several.")
@click.option("--against-reference", is_flag=True, help="Only groups containing a reference file; reference "
              "files are not compared with each other ('which of these do I already have?').")
@click.option("--move-to", type=click.Path(file_okay=False), help="Move every non-keeper into this folder "
              "(under its relative path). Lists the moves unless --yes. Never deletes or overwrites.")
@click.option("--yes", is_flag=True, help="With --move-to: really move the files.")
@filter_options
@root_option
@html_option
@format_option
@quiet_option
def dupes(index_path, threshold, min_size, reference, against_reference, move_to, yes, root, html_file, fmt,
          **filters):
    """Find groups of duplicate and near-duplicate images in the whole index, one group per line:
    the size of the group, the suggested keeper (reference folder, else most pixels, then largest
    file, then oldest), and every other member with its score against the keeper."""
    from .dupes import move_duplicates, plan_moves
    from .index import Index

    if yes and not move_to:
        raise click.UsageError("--yes goes with --move-to")
    if against_reference and not reference:
        raise click.UsageError("--against-reference needs at least one --reference folder")
    with Index.open(index_path, read_only=not (move_to and yes), root=root) as index:
        filter = make_filter(filters, index)
        reference = tuple(index.folder_key(folder) for folder in reference)
        if move_to:
            plan_moves(index, [], move_to, reference)  # a destination it refuses: before any work
        with progress_bar("comparing") as on_progress:
            groups = index.duplicates(threshold=threshold, filter=filter, reference=reference,
                                      against_reference=against_reference, min_size=min_size,
                                      on_progress=on_progress)
        explain_empty(index, None, groups, filter)
        if fmt == "csv":
            printer = Printer("csv")
            for number, group in enumerate(groups, 1):
                for member, score, same in zip(group.members, group.scores, group.identical):
                    printer({"group": number, "keeper": member is group.keeper, "score": round(score, 6),
                             "identical": same, "id": member["id"], "path": member["path"],
                             "abspath": member["abspath"], "width": member["width"], "height": member["height"],
                             "size": member["size"]})
        else:
            printer = Printer(fmt, line=lambda record: record["line"])
            for group in groups:
                printer(group.to_dict() if fmt == "json" else {"line": dupe_line(group)})
        if html_file:
            from .report import dupes_page

            dupes_page(html_file, index, groups)
        if not move_to:
            dupes = sum(len(g.members) - 1 for g in groups)
            used = index.dupes_threshold if threshold is None else threshold
            warn(f"{len(groups)} group{'s' * (len(groups) != 1)}, {dupes} duplicate{'s' * (dupes != 1)} "
                 f"(threshold {used:g})")
            return
        moves = plan_moves(index, groups, move_to, reference)
        if not yes:
            for move in moves:
                click.echo(f"would move {shown(move.source)} -> {shown(move.destination)}")
            warn(f"{len(moves)} file{'s' * (len(moves) != 1)} would move: run again with --yes to move them")
            return

        def report(move, problem):
            if problem:  # an error, which fails the command: said even with -q
                click.echo(f"not moved {shown(move.source)}: {problem}", err=True)
            else:
                click.echo(f"moved {shown(move.source)} -> {shown(move.destination)}")

        moved = move_duplicates(index, moves, on_move=report)
    warn(f"moved {moved} of {len(moves)} files to {move_to}" + ("; move them back to undo" if moved else ""))
    if moved < len(moves):  # each file left was named above; a script must not take this for success
        raise click.exceptions.Exit(1)


@cli.command("list")
@index_option
@filter_options
@click.option("--limit", type=click.IntRange(1), help="At most this many images.")
@click.option("--sort", "order", type=click.Choice(["path", "date", "size", "id"]), default="path", show_default=True)
@root_option
@format_option
@quiet_option
def list_cmd(index_path, limit, order, root, fmt, **filters):
    """List the indexed images (optionally filtered) with their metadata and labels."""
    from .index import Index

    printer = Printer(fmt, ("id", "width", "height", "format", "date", "labels", "path"))
    with Index.open(index_path, read_only=True, root=root) as index:
        filter = make_filter(filters, index)
        listed = 0
        for record in index.images(filter, order=order, limit=limit):
            printer(record)
            listed += 1
        explain_empty(index, None, listed, filter)


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="PATH_OR_ID...")
@index_option
@click.option("--add", "add", multiple=True, metavar="NAME", help="Label to add. Repeat for several.")
@click.option("--remove", "remove", multiple=True, metavar="NAME", help="Label to remove. Repeat for several.")
@quiet_option
def label(images, index_path, add, remove):
    """Add or remove labels on indexed images (files, folders of them, or ids)."""
    from .index import Index

    if not add and not remove:
        raise click.UsageError("give --add NAME and/or --remove NAME")
    named = {}
    for option, names in (("--add", add), ("--remove", remove)):
        try:
            named[option] = Filter(labels=tuple(names)).labels  # checked as a filter's labels: exit 2 if misused
        except ImgsimError as e:
            raise click.BadParameter(str(e), param_hint=option) from None
    if both := sorted(set(named["--add"]) & set(named["--remove"])):
        raise click.UsageError(f"label {both[0]!r} is given to both --add and --remove")
    with Index.open(index_path) as index:
        count = index.label(images, add=add, remove=remove)
    done = " and ".join(word for word, asked in (("labelled", add), ("unlabelled", remove)) if asked)
    click.echo(f"{done} {count} image{'s' * (count != 1)}")


@cli.command()
@index_option
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@quiet_option
def info(index_path, as_json):
    """Describe an index: size, model, parameters, files."""
    from .index import Index

    with Index.open(index_path, read_only=True) as index:
        data = index.info()
    if as_json:
        Printer("json")(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key}: {value}")


@cli.command()
@index_option
@format_option
@quiet_option
def errors(index_path, fmt):
    """List the files that could not be indexed, and why."""
    from .index import Index

    printer = Printer(fmt, line=lambda r: f"{shown(r['abspath'])}: {r['reason']}")
    with Index.open(index_path, read_only=True) as index:
        failures = 0
        for path, reason, seen in index.errors():
            printer({"path": path, "abspath": str(index.resolve(path)), "reason": reason, "seen": seen})
            failures += 1
    if not failures:
        warn("no file failed to index")


@cli.command()
@index_option
@quiet_option
def rebuild(index_path):
    """Rebuild the FAISS file from the vectors stored in SQLite (drops removed images from the graph;
    an index made by an older imgsim gets today's graph: reduced from 10,000 images, efConstruction 320)."""
    from .index import Index

    with Index.open(index_path) as index:
        index.rebuild()
        click.echo(f"rebuilt {index.faiss_path} with {len(index)} images")


@cli.command()
@index_option
@click.option("--repair", is_flag=True, help="Fix what can be fixed: rebuild the FAISS file, drop unpaired rows.")
@root_option
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@quiet_option
def verify(index_path, repair, root, as_json):
    """Check that an index agrees with itself; exit code 1 if a problem remains."""
    from .index import Index

    with Index.open(index_path, read_only=not repair, root=root) as index:
        report = index.verify(repair=repair)
        count = len(index)
    if as_json:
        Printer("json")(report.to_dict())
    else:
        for line in report.repaired:
            click.echo(f"repaired: {line}")
        for line in report.problems:
            click.echo(f"problem: {line}")
        for line in report.notes:
            click.echo(f"note: {line}")
        click.echo(f"{'ok' if report.ok else 'NOT OK'}: {count} images")
    if not report.ok:
        sys.exit(1)


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@quiet_option
@click.pass_context
def models(ctx, as_json):
    """List the known models: installed or not, where, and whether the file is verified."""
    if ctx.invoked_subcommand is not None:
        return
    from .installer import catalogue_status
    from .models import default_model

    default, why = default_model()
    for entry in catalogue_status():
        data = entry.to_dict()
        if as_json:
            is_default = data["name"] == default
            Printer("json")({**data, "default": is_default, **({"default_because": why} if is_default else {})})
            continue
        verified = {True: "sha256 verified", False: "sha256 MISMATCH", None: "no published sha256"}[entry.verified]
        where = f"{data['path']} ({data['bytes'] / 1e6:.1f} MB, {verified})" if data["installed"] else "not installed"
        mark = "  (default)" if data["name"] == default else ""
        click.echo(f"{data['name']:<26} {data['dimensions']:>5}-d  {data['input_size']}px  {where}{mark}")
    if not as_json:
        click.echo(f"default: {default} ({why})")


@models.command("add")
@click.argument("name")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--url", help="Download the file from this URL instead (needs --sha256).")
@click.option("--sha256", "sha256", metavar="HEX", help="Expected sha256 of the file.")
@quiet_option
def models_add(name, file, url, sha256):
    """Install a model file as NAME into $IMGSIM_MODELS (or ~/.local/share/imgsim/models).

    The file is checked (sha256, loads in onnxruntime, right output size) before it is installed.
    """
    from .installer import install_file, install_url
    from .models import default_model

    if bool(file) == bool(url):
        raise click.UsageError("give either FILE or --url")
    if url and not sha256:
        raise click.UsageError("--url needs --sha256, so that nothing unverified is installed")
    if sha256 and not (len(sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha256)):
        raise click.UsageError(f"--sha256 {sha256!r} is not a sha256: 64 hexadecimal digits")
    before = default_model()[0]
    path = install_url(name, url, sha256) if url else install_file(name, file, sha256)
    click.echo(f"installed {name} at {path}")
    now, why = default_model()
    if now != before:
        warn(f"{now} is now the default model for new indexes ({why}); existing indexes keep theirs")


@cli.command()
@index_option
@root_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address needs --token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token", envvar="IMGSIM_TOKEN", show_envvar=True, default=None,
              help="Secret every request must carry (Authorization: Bearer TOKEN, or open /?token=TOKEN once).")
@click.option("--cors", multiple=True, metavar="ORIGIN", help="Let web pages from ORIGIN call the API (repeatable).")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest accepted upload.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(1),
              help="Refuse uploads whose header claims more pixels (decompression bombs).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds an upload may take to arrive, and a request may wait for a worker.")
@quiet_option
@click.pass_obj
def serve(obj, index_path, root, host, port, token, cors, max_upload_mb, max_pixels, timeout):
    """Search the index from a web page at http://127.0.0.1:8000/ and over HTTP (POST /search, /docs).

    Needs the serve extra: pip install 'imgsim[serve]'. Follows `imgsim index` runs without a restart.
    """
    try:
        from .server import ServeSettings, run as run_server
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("fastapi", "starlette", "uvicorn", "python_multipart", "anyio"):
            raise click.ClickException(f"imgsim serve needs the serve extra ({e.name} is missing): "
                                       f"pip install 'imgsim[serve]'") from None
        raise
    run_server(ServeSettings(index=index_path, root=root, host=host, port=port, token=token, cors=tuple(cors),
                             max_upload_bytes=int(max_upload_mb * 1_000_000), max_pixels=max_pixels,
                             timeout=timeout), quiet=obj["quiet"])


# -- export, import, embed: thin commands over imgsim.export, whose extras load lazily --------------
def selection_of(filter: Filter):
    """The export selection for the same filters as `search` and `list`."""
    from .export.source import ALL, Selection

    if filter.empty:
        return ALL
    where, params = filter.where()
    return Selection(where=where, params=params)


@cli.group("export")
@quiet_option
def export_group():
    """Hand the index to other engines: a Parquet file, or a Qdrant collection kept in sync."""


@export_group.command("parquet")
@click.argument("file", type=click.Path(dir_okay=False))
@index_option
@click.option("--row-group-size", default=8192, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Rows per row group (what is held in memory at once).")
@click.option("--compression", default="zstd", show_default=True,
              type=click.Choice(["zstd", "snappy", "gzip", "lz4", "none"]))
@filter_options
@quiet_option
def export_parquet_cmd(file, index_path, row_group_size, compression, **filters):
    """Write every image (id, path, metadata, labels, vector) to the Parquet FILE, with the index's
    manifest in the file's metadata (needs `pip install 'imgsim[export]'`). The filters of `search`
    limit which images go."""
    from .export.parquet import export_parquet
    from .index import Index

    with Index.open(index_path, read_only=True) as index, progress_bar("exporting") as on_progress:
        selection = selection_of(make_filter(filters, index))
        count = export_parquet(index, file, row_group_size=row_group_size, on_progress=on_progress,
                               compression=compression, selection=selection)
    click.echo(f"exported {count} images to {file} ({Path(file).stat().st_size / 1e6:.1f} MB)")


@export_group.command("qdrant")
@click.option("--url", help="A Qdrant server, e.g. http://localhost:6333.")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the server's API key.")
@click.option("--path", "local_path", type=click.Path(file_okay=False), help="Qdrant local mode in this folder.")
@click.option("--collection", help="Collection name. Default: the index's name.")
@index_option
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--recentre", is_flag=True, help="Renew the centre the vectors are exported around (sends every point).")
@click.option("--recreate", is_flag=True, help="Delete the collection first and export everything.")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@quiet_option
def export_qdrant_cmd(url, api_key_env, local_path, collection, index_path, batch_size, recentre, recreate,
                      as_json, **filters):
    """Create or sync a Qdrant collection: only what changed since the last export is sent, what was
    removed is deleted, and an interrupted export resumes (needs `pip install 'imgsim[qdrant]'`).
    The filters of `search` limit which images the collection holds."""
    import os

    from .export.qdrant import connect, export_qdrant
    from .index import Index, index_files

    if bool(url) == bool(local_path):
        raise click.UsageError("give either --url URL or --path DIR")
    if api_key_env and not url:
        raise click.UsageError("--api-key-env goes with --url")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise click.ClickException(f"environment variable {api_key_env} is not set")
    client, location = connect(url=url, api_key=api_key, path=local_path)
    try:
        with Index.open(index_path) as index, progress_bar("exporting") as on_progress:
            selection = selection_of(make_filter(filters, index))
            report = export_qdrant(index, client, location, collection or index_files(index_path)[1].stem,
                                   batch_size=batch_size, recentre=recentre, recreate=recreate,
                                   on_progress=on_progress, selection=selection)
    finally:
        client.close()
    if as_json:
        Printer("json")(report.to_dict())
    else:
        click.echo(f"{report.collection}: wrote {report.written}, deleted {report.deleted}, unchanged "
                   f"{report.unchanged}, {report.points} points"
                   + (", re-centred" if report.recentred else "") + f" in {report.seconds:.1f} s")


@cli.group("import")
@quiet_option
def import_group():
    """Build an index from an exported file."""


@import_group.command("parquet")
@click.argument("file", type=click.Path(dir_okay=False))
@index_option
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Where the images are on this machine. Default: where they were when exported, if it exists.")
@quiet_option
def import_parquet_cmd(file, index_path, root):
    """Create a new index from a Parquet FILE written by `imgsim export parquet` (no re-embedding)."""
    from .export.parquet import import_parquet
    from .index import index_files

    with progress_bar("importing") as on_progress:
        count = import_parquet(file, index_path, root=root, on_progress=on_progress)
    click.echo(f"imported {count} images into {index_files(index_path)[1]}")


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@index_option
@click.option("--raw", is_flag=True, help="The model's embedding as is, not centred for the index's exports.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@quiet_option
def embed(files, index_path, raw, as_json):
    """Print the query vector of each image FILE for this index's exports: embedded with its model and,
    from 200 images on, centred as `imgsim export qdrant` centred the points, so Qdrant ranks as imgsim
    (as `imgsim search --exact --no-expand`; the picture as it is, a turned one not also upright)."""
    import numpy as np

    from .export.state import query_centre, query_vector
    from .index import Index

    with Index.open(index_path, read_only=True) as index:
        centred = not raw and query_centre(index.store) is not None
        for file in files:
            vector = index.embed(file) if raw else query_vector(index, file)
            data = {"file": file, "model": index.model_name, "centred": centred,
                    "vector": [float(v) for v in vector.astype(np.float32)]}
            if as_json:
                Printer("json")(data)
            else:
                click.echo(f"{shown(file)}\t" + " ".join(f"{v:.6g}" for v in vector))


def main() -> None:
    """The `imgsim` command. Once a command has finished (its index closed, its files written), the
    process ends at once (`os._exit`) instead of tearing down the interpreter: unloading FAISS,
    onnxruntime and numpy's BLAS threads cost ~0.1 s of every cold `imgsim search`
    (scripts/bench_cold.py). An unexpected error still ends the usual way, with its traceback."""
    try:
        cli(prog_name="imgsim")
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python prints it
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`imgsim list | head`): nothing left to say
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
