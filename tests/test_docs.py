"""The README runs as written (in the manner of sqlite-utils' tests/test_docs.py): every ```python block
is run as a reader would run it, one after another in one folder, and every `imgsim` command line in a
```bash block names a real command, with help, and only options that command has.

Only what a reader's machine provides is supplied: a home folder whose ~/Pictures holds photos, and
query.jpg, a.jpg and b.jpg in the working folder. New blocks are covered without changing this file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from imgsim.cli import cli

from .conftest import run

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


def command_lines() -> list[str]:
    """Each `imgsim ...` command in the bash blocks (one per `&&`-chained part, comments dropped)."""
    found = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line)[0]
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part)
                if words and (words[0] == "imgsim" or words[0].endswith("/imgsim")):
                    found.append(part.strip())
    return found


def test_the_readme_has_python_examples_and_commands():
    assert code_blocks("python")
    assert len(command_lines()) >= 8


@pytest.mark.parametrize("line", command_lines())
def test_readme_command_exists_with_its_options(line):
    words = [w.strip("[]") for w in shlex.split(line)[1:]]
    command: click.Command = cli
    path = []
    while words and isinstance(command, click.Group):
        word = words.pop(0)
        if word.startswith("-"):
            assert word in [opt for p in command.params for opt in p.opts], f"{line}: no option {word}"
            continue
        assert word in command.commands, f"{line}: no command {word!r}"
        command = command.commands[word]
        path.append(word)
    assert command.help, f"{line}: no help text"
    options = {opt for p in command.params for opt in p.opts}
    for word in words:
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"{line}: `imgsim {' '.join(path)}` has no option {word}"
    helped = run(*path, "--help")
    assert helped.exit_code == 0 and "Usage:" in helped.stdout


@pytest.fixture
def reader(tmp_path, photos_master) -> tuple[Path, dict]:
    """A reader's machine: ~/Pictures holds photos, query.jpg (and a.jpg, b.jpg) sit in the working folder."""
    home = tmp_path / "home"
    shutil.copytree(photos_master, home / "Pictures")
    work = tmp_path / "work"
    work.mkdir()
    for name, photo in (("query.jpg", "coffee.jpg"), ("a.jpg", "rocket.jpg"), ("b.jpg", "astronaut.jpg")):
        shutil.copy(photos_master / photo, work / name)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(README.parent)}
    env.pop("IMGSIM_MODELS", None)  # the bundled models, as a reader has them
    return work, env


def test_readme_python_examples_run_as_written(reader):
    work, env = reader
    for number, block in enumerate(code_blocks("python"), 1):
        done = subprocess.run([sys.executable, "-c", block], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"README python block {number} failed:\n{block}\n{done.stderr}"
        assert done.stdout.strip(), f"README python block {number} printed nothing"
