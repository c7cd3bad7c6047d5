"""A command loads only what it uses: a cold `imgsim` process pays for importing numpy, Pillow, FAISS,
onnxruntime and sqlite-utils only where the command needs them (README, "At 100,000 and 1,000,000
images"; the timings are `scripts/bench_cold.py`'s, not a test's). Each command runs in a fresh
process here, and the modules loaded when it ends are compared with what it may load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import build_index

TINY_CLI = Path(__file__).with_name("tiny_model.py")  # the imgsim CLI with the tiny model registered
HEAVY = ("numpy", "numpy.ma", "PIL", "faiss", "onnxruntime", "sqlite_utils")  # numpy.ma: ~20 ms, by np.unique

RUN = """
import json, os, runpy, sys
os._exit = sys.exit  # `main` ends the process at once when a command is done; here it must come back
sys.argv = {argv!r}
code = 0
try:
    {call}
except SystemExit as e:
    code = e.code
print(json.dumps({{"exit": code, "loaded": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def loaded_by(code: str, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_command(args: list[str], cwd: Path) -> dict:
    """Run the CLI (with the tiny model registered) in a fresh process: its exit code and what it loaded."""
    call = f"runpy.run_path({str(TINY_CLI)!r}, run_name='__main__')"
    return loaded_by(RUN.format(argv=[str(TINY_CLI), *map(str, args)], call=call, heavy=HEAVY), cwd)


@pytest.fixture
def small_index(tmp_path, photos):
    return build_index(tmp_path / "idx", photos)


def test_importing_imgsim_and_its_cli_loads_no_heavy_library(tmp_path):
    code = RUN.format(argv=["x"], call="import imgsim, imgsim.cli", heavy=HEAVY)
    assert loaded_by(code, tmp_path) == {"exit": 0, "loaded": []}


def test_help_loads_no_heavy_library(tmp_path):
    code = RUN.format(argv=["imgsim", "--help"], call="from imgsim.cli import main; main()", heavy=HEAVY)
    assert loaded_by(code, tmp_path) == {"exit": 0, "loaded": []}


@pytest.mark.parametrize("command", [["list"], ["errors"], ["list", "--label", "x", "--since", "2020"]])
def test_commands_without_graph_or_model_load_neither(small_index, tmp_path, command):
    result = run_command([*command, "--index", small_index], tmp_path)
    assert result["exit"] == 0
    assert result["loaded"] == ["PIL", "numpy"]  # no faiss, no onnxruntime, no sqlite_utils


def test_info_loads_the_graph_but_not_the_model(small_index, tmp_path):
    result = run_command(["info", "--index", small_index], tmp_path)
    assert result["exit"] == 0
    assert result["loaded"] == ["PIL", "faiss", "numpy"]


def test_search_reads_without_sqlite_utils(small_index, photos, tmp_path):
    result = run_command(["search", photos / "coffee.jpg", "--index", small_index, "-k", "2"], tmp_path)
    assert result["exit"] == 0
    assert result["loaded"] == ["PIL", "faiss", "numpy", "onnxruntime"]  # sqlite-utils is for writers


def test_writers_still_use_sqlite_utils(small_index, tmp_path):
    result = run_command(["label", "coffee.jpg", "--add", "drink", "--index", small_index], tmp_path)
    assert result["exit"] == 0 and "sqlite_utils" in result["loaded"]
