"""Installed as a wheel, from another directory, imgsim finds its bundled model inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh venv holding only the imgsim wheel; its dependencies come from this environment."""
    work = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(REPO)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"wheel build failed: {build.stderr[-2000:]}")
    (wheel,) = (work / "dist").glob("imgsim-*.whl")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # Dependencies (faiss, onnxruntime, ...) from this environment, appended after the venv's own packages.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    return env_dir, wheel


def test_wheel_carries_the_model_and_works_from_elsewhere(wheel_env, photos, tmp_path):
    env_dir, wheel = wheel_env
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("IMGSIM_MODELS", "PYTHONPATH")}
    env["IMGSIM_MODELS"] = str(tmp_path / "no-models-here")
    where = subprocess.check_output(
        [python, "-c", "import imgsim, imgsim.models as m; print(imgsim.__file__); print(m.find_file(m.CATALOGUE['efficientnet-lite0']))"],
        cwd=tmp_path, env=env, text=True).split()
    assert str(env_dir) in where[0] and str(REPO) not in where[0]
    assert where[1].endswith("imgsim/_models/efficientnet-lite0.onnx") and str(env_dir) in where[1]
    cli = [python, "-m", "imgsim.cli"]
    subprocess.run([*cli, "index", str(photos), "--index", "w"], cwd=tmp_path, env=env, check=True, capture_output=True)
    out = subprocess.run([*cli, "search", str(photos / "rocket.jpg"), "--index", "w", "-k", "1"], cwd=tmp_path,
                         env=env, check=True, capture_output=True, text=True).stdout
    assert out.split()[2].endswith("rocket.jpg")


def test_wheel_carries_the_licence_and_the_models_readme(wheel_env):
    """The project's Apache-2.0 text, and models/README.md (each bundled model's source, licence and
    checksum) beside the model files."""
    _, wheel = wheel_env
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        licences = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
        assert len(licences) == 1, names
        assert whl.read(licences[0]) == (REPO / "LICENSE").read_bytes()
        assert whl.read("imgsim/_models/README.md") == (REPO / "models" / "README.md").read_bytes()
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "END OF TERMS AND CONDITIONS" in text


def test_gitignore_lists_what_the_readme_quickstart_writes():
    assert "samples/" in (REPO / ".gitignore").read_text().splitlines()
