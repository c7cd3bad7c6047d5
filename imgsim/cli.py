"""The `imgsim` command line: each command parses, calls `Index`, and formats. Results go to stdout,
progress and notices to stderr; `--json` prints one JSON object per line."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from .errors import ImgsimError
from .images import DEFAULT_MAX_PIXELS
from .index import Index, SyncReport, index_files

DEFAULT_INDEX = "imgsim"
INDEX_HELP = "Index name: NAME.faiss and NAME.sqlite. Default: $IMGSIM_INDEX, else ./imgsim."


class ImgsimGroup(click.Group):
    """Turns every `ImgsimError` into a one-line `Error: ...` and exit code 1, in one place."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ImgsimError as e:
            raise click.ClickException(str(e)) from None
        except sqlite3.DatabaseError as e:  # damage the open-time checks could not see
            raise click.ClickException(f"the index database is damaged: {e}; restore it, or re-index") from None


def index_option(f):
    return click.option("--index", "index_path", envvar="IMGSIM_INDEX", default=DEFAULT_INDEX,
                        show_envvar=True, metavar="PATH", help=INDEX_HELP)(f)


def root_option(f):
    return click.option("--root", type=click.Path(file_okay=False), default=None,
                        help="Where the indexed images are now, if not where the index says.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(f)


def emit(data: dict) -> None:
    click.echo(json.dumps(data))


def shown(path) -> str:
    """A path as text that any terminal can print (file names that are not UTF-8 get U+FFFD)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def warn(message: str) -> None:
    click.echo(message, err=True)


@click.group(cls=ImgsimGroup)
@click.version_option(package_name="imgsim")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notices on stderr.")
@click.pass_context
def cli(ctx, quiet):
    """Find similar and duplicate images, offline: index a folder, then search it."""
    ctx.obj = {"quiet": quiet}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("imgsim: %(message)s"))
    logger = logging.getLogger("imgsim")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@contextmanager
def progress_bar(label: str, quiet: bool):
    """A callback `(done, total)` that draws a bar on stderr once there is something to show."""
    state = {}

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
@click.argument("folder", type=click.Path(file_okay=False, path_type=str))
@index_option
@click.option("--model", default=None, help="Model for a new index (see `imgsim models`). Default: resnet50 if "
              "installed, else efficientnet-lite0.")
@click.option("--keep-missing", is_flag=True, help="Keep entries whose files are gone from FOLDER.")
@click.option("--strict", is_flag=True, help="Exit with code 3 if any file could not be indexed.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(1),
              help="Skip images whose header claims more pixels (decompression bombs).")
@json_option
@click.pass_obj
def index_cmd(obj, folder, index_path, model, keep_missing, strict, batch_size, max_pixels, as_json):
    """Index the images in FOLDER (recursively), creating the index or bringing it up to date.

    Only new and changed files are embedded; moved files keep their vectors; entries for files
    that are gone from FOLDER are removed unless --keep-missing.
    """
    if not Path(folder).is_dir():
        raise click.ClickException(f"folder {folder} does not exist")
    _, sqlite_path = index_files(index_path)
    if sqlite_path.exists():
        index = Index.open(index_path)
        if model and model != index.model_name:
            index.close()
            raise click.ClickException(f"index {index_path} was made with {index.model_name}, not {model}: "
                                       f"use another --index for a {model} index")
    else:
        index = Index.create(index_path, model=model, root=folder)
    quiet = obj["quiet"]
    with index, progress_bar("embedding", quiet) as on_progress:
        report = index.sync(folder, remove_missing=not keep_missing, on_progress=on_progress,
                            on_skip=lambda path, reason: warn(f"skipped {shown(path)}: {reason}"),
                            batch_size=batch_size, max_pixels=max_pixels)
    if as_json:
        emit(report.to_dict())
    else:
        click.echo(summary_line(report))
    if strict and report.failed:
        sys.exit(3)


def summary_line(report: SyncReport) -> str:
    return (f"added {report.added}, updated {report.updated}, moved {report.moved}, removed {report.removed}, "
            f"unchanged {report.unchanged}, failed {report.failed} in {report.seconds:.1f} s "
            f"({report.images_per_second:.1f} images/s)")


@cli.command()
@click.argument("queries", nargs=-1, required=True, metavar="QUERY...")
@index_option
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Results per query.")
@root_option
@json_option
def search(queries, index_path, k, root, as_json):
    """Find the indexed images most similar to each QUERY image file.

    Scores are cosine similarity: 1.0 is the same picture, higher is closer.
    """
    with Index.open(index_path, read_only=True, root=root) as index:
        for query in queries:
            results = index.search(query, k=k)
            if as_json:
                for result in results:
                    emit(result.to_dict())
                continue
            if len(queries) > 1:
                click.echo(f"{query}:")
            for r in results:
                click.echo(f"{r.rank:>3}  {r.score:.4f}  {shown(index.resolve(r.path))}")


@cli.command()
@index_option
@json_option
def info(index_path, as_json):
    """Describe an index: size, model, parameters, files."""
    with Index.open(index_path, read_only=True) as index:
        data = index.info()
    if as_json:
        emit(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key}: {value}")


@cli.command()
@index_option
@json_option
def errors(index_path, as_json):
    """List the files that could not be indexed, and why."""
    with Index.open(index_path, read_only=True) as index:
        for path, reason, seen in index.errors():
            if as_json:
                emit({"path": path, "reason": reason, "seen": seen})
            else:
                click.echo(f"{shown(index.resolve(path))}: {reason}")


@cli.command()
@index_option
def rebuild(index_path):
    """Rebuild the FAISS file from the vectors stored in SQLite (drops removed images from the graph)."""
    with Index.open(index_path) as index:
        index.rebuild()
        click.echo(f"rebuilt {index.faiss_path} with {len(index)} images")


@cli.command()
@index_option
@click.option("--repair", is_flag=True, help="Fix what can be fixed: rebuild the FAISS file, drop unpaired rows.")
@root_option
@json_option
def verify(index_path, repair, root, as_json):
    """Check that an index agrees with itself; exit code 1 if a problem remains."""
    with Index.open(index_path, read_only=not repair, root=root) as index:
        report = index.verify(repair=repair)
        count = len(index)
    if as_json:
        emit(report.to_dict())
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
@json_option
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
            emit({**data, "default": data["name"] == default})
            continue
        verified = {True: "sha256 verified", False: "sha256 MISMATCH", None: "no published sha256"}[entry.verified]
        where = f"{data['path']} ({data['bytes'] / 1e6:.1f} MB, {verified})" if data["installed"] else "not installed"
        click.echo(f"{data['name']:<24} {data['dimensions']:>5}-d  {data['input_size']}px  {where}")
    if not as_json:
        click.echo(f"default: {default} ({why})")


@models.command("add")
@click.argument("name")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--url", help="Download the file from this URL instead (needs --sha256).")
@click.option("--sha256", "sha256", metavar="HEX", help="Expected sha256 of the file.")
def models_add(name, file, url, sha256):
    """Install a model file as NAME into $IMGSIM_MODELS (or ~/.local/share/imgsim/models).

    The file is checked (sha256, loads in onnxruntime, right output size) before it is installed.
    """
    from .installer import install_file, install_url

    if bool(file) == bool(url):
        raise click.UsageError("give either FILE or --url")
    if url and not sha256:
        raise click.UsageError("--url needs --sha256, so that nothing unverified is installed")
    path = install_url(name, url, sha256) if url else install_file(name, file, sha256)
    click.echo(f"installed {name} at {path}")


def main() -> None:
    cli(prog_name="imgsim")


if __name__ == "__main__":
    main()
