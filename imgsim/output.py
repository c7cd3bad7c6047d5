"""Printing records for people and programs: an aligned table (the default), JSON lines, or CSV.

Every command that prints records goes through `Printer`, so `--json` and `--csv` exist wherever
records are printed and mean the same thing everywhere.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from collections.abc import Callable, Iterable

import click


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}  # C0, DEL and C1 (U+009B is a CSI)


def shown(path, one_line: bool = True) -> str:
    """A path as text that any terminal can print: bytes that are not UTF-8 get U+FFFD, and (for
    one line per record) control characters, such as a newline in a file name, are written \\xNN."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text.translate(_CONTROL) if one_line else text


def json_text(data, **options) -> str:
    """`data` as JSON text that is valid UTF-8 whatever file names it holds. A name that is not UTF-8
    is held as surrogate escapes (as Python reads such names); those are written \\udcNN, so the text
    stays valid, and `os.fsencode(json.loads(text)[...])` gives the name's bytes back."""
    text = json.dumps(data, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True, **options)
    return text


def _cell(value, one_line: bool = True) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ",".join(shown(v, one_line) for v in value)
    return "" if value is None else shown(value, one_line)


class Printer:
    """Prints dict records as `fmt` ("table", "json" or "csv"). A table shows `columns` (in that
    order, or as `line` makes it); JSON shows every field; CSV every field, with a header from the first record."""

    def __init__(self, fmt: str, columns: Iterable[str] = (), line: Callable[[dict], str] | None = None):
        self.fmt = fmt
        self.columns = list(columns)
        self.line = line
        self._csv = None
        self._header_done = False

    def __call__(self, record: dict) -> None:
        if self.fmt == "json":
            click.echo(json_text(record, default=str))
        elif self.fmt == "csv":
            if self._csv is None:
                self._csv = csv.DictWriter(sys.stdout, fieldnames=list(record), extrasaction="ignore",
                                           lineterminator="\n")
                self._csv.writeheader()
            # CSV quotes a field with a newline in it: the path as it is.
            self._csv.writerow({k: _cell(v, one_line=False) if not isinstance(v, (int, float)) else v
                                for k, v in record.items()})
            sys.stdout.flush()
        elif self.line is not None:
            click.echo(self.line(record))
        else:
            click.echo("  ".join(_cell(record.get(c)) for c in self.columns))

    def heading(self, text: str) -> None:
        """A line for people only (such as which query the next rows belong to)."""
        if self.fmt == "table":
            click.echo(text)


def format_option(f):
    """--json / --csv, mutually exclusive (given both: a usage error); the table is the default.
    The command receives `fmt`: "table", "json" or "csv"."""

    @functools.wraps(f)
    def command(*args, as_json: bool, as_csv: bool, **kwargs):
        if as_json and as_csv:
            raise click.UsageError("--json and --csv cannot be used together")
        return f(*args, fmt="json" if as_json else "csv" if as_csv else "table", **kwargs)

    command = click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")(command)
    return click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(command)
