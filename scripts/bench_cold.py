"""Cold-start figures of the command line: what each `imgsim` command costs from a fresh process.

    python scripts/bench_cold.py [--index PATH --photo FILE] [--runs 10] [--before SRC_DIR]

Every command runs `--runs` times in a new process, the commands taken in turn (round-robin), so
that a machine shared with other jobs slows them all alike; each figure is the median, as wall time
and as CPU time (user + system, from wait4, which says more on a busy machine). Baselines in the
same run: `python -c pass`, `import numpy`, and importing every library a search needs (numpy,
Pillow, FAISS, onnxruntime): no `imgsim search` can start faster than that.

Without `--index`, a small index of scikit-image's photos is made with the bundled model in a
temporary folder (searching it costs what searching 100,000 images costs, less ~10-40 ms of opening
a bigger graph; `scripts/bench_scale.py` measures that). `--before SRC_DIR` also runs the commands
from another source tree (e.g. `git worktree add /tmp/before main`) through PYTHONPATH, for a
before/after in one run. Both trees get their bytecode compiled first, as a wheel's install does
(with PYTHONDONTWRITEBYTECODE set, as on the project's machine, imgsim's own modules would
otherwise be compiled from source at every start: ~0.1 s that no installed user pays).

It also prints where a cold search's imports go (`python -X importtime`), by top-level package.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


def timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one run of `cmd`, which must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=env["BENCH_CWD"])
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def environment(src: Path | None) -> dict:
    """The children's environment: `src` first on the path, and (in BENCH_CWD) a working folder
    that holds no imgsim, since `python -m` looks there first."""
    env = dict(os.environ, BENCH_CWD=tempfile.gettempdir())
    if src is not None:
        env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def small_index(workdir: Path) -> tuple[Path, Path]:
    """An index of scikit-image's photos (bundled model), and one of them as the query."""
    sys.path.insert(0, str(HERE.parent))
    from sample_photos import PHOTOS, photo

    folder = workdir / "photos"
    folder.mkdir()
    for name in PHOTOS:
        img = photo(name)
        if img is not None:
            img.save(folder / f"{name}.jpg", quality=90)
    index = workdir / "idx"
    env = environment(REPO)
    subprocess.run([sys.executable, "-m", "imgsim.cli", "-q", "index", str(folder), "--index", str(index)],
                   check=True, env=env, cwd=env["BENCH_CWD"])
    time.sleep(3.5)  # a FAISS file changed in the last 3 s is checked in full at every open (imgsim/checked.py)
    return index, folder / "coffee.jpg"


def import_breakdown(cmd: list[str], env: dict, runs: int = 3) -> dict[str, float]:
    """Median milliseconds of import (self time, summed) per top-level package, over `runs` runs."""
    per_run = []
    for _ in range(runs):
        err = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True,
                             env=env, cwd=env["BENCH_CWD"]).stderr
        totals: dict[str, float] = {}
        for line in err.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
            if m:
                top = m[2].split(".")[0].lstrip("_")
                totals[top] = totals.get(top, 0.0) + int(m[1]) / 1000
        per_run.append(totals)
    names = set().union(*per_run)
    return {name: statistics.median(r.get(name, 0.0) for r in per_run) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="An existing index (default: a small one made here).")
    parser.add_argument("--photo", help="The query picture (with --index).")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--before", type=Path, help="Another imgsim source tree to run the same commands from.")
    args = parser.parse_args()
    if bool(args.index) != bool(args.photo):
        sys.exit("give --index and --photo together")

    trees = {"now": REPO} | ({"before": args.before.resolve()} if args.before else {})
    for src in trees.values():
        compileall.compile_dir(str(src / "imgsim"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="imgsim-cold-") as tmp:
        os.environ.setdefault("IMGSIM_CACHE", str(Path(tmp) / "cache"))
        index, photo = (Path(args.index), Path(args.photo)) if args.index else small_index(Path(tmp))
        py = [sys.executable]
        imgsim = [sys.executable, "-m", "imgsim.cli"]
        commands = {
            "python -c pass": (py + ["-c", "pass"], None),
            "import numpy": (py + ["-c", "import numpy"], None),
            "import numpy, PIL, faiss, onnxruntime": (
                py + ["-c", "import os; os.environ['ORT_DISABLE_TELEMETRY'] = '1'; "
                            "import numpy, PIL.Image, faiss, onnxruntime"], None),
        }
        for label, src in trees.items():
            suffix = f" [{label}]" if len(trees) > 1 else ""
            commands |= {
                f"imgsim --help{suffix}": (imgsim + ["--help"], src),
                f"imgsim list{suffix}": (imgsim + ["list", "--index", str(index), "--limit", "5"], src),
                f"imgsim info{suffix}": (imgsim + ["info", "--index", str(index)], src),
                f"imgsim search photo.jpg{suffix}": (imgsim + ["search", str(photo), "--index", str(index)], src),
            }
        for cmd, src in commands.values():  # warm the page cache (files, model, graph): not a cold disk
            timed(cmd, environment(src))
        time.sleep(3.5)  # files written in the last 3 s get no record in the cache yet (imgsim/checked.py)
        for name, (cmd, src) in commands.items():
            if "search" in name:  # now they do: the state every later start of a user's finds
                timed(cmd, environment(src))
        load_before = os.getloadavg()
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        names = list(commands)
        for round_ in range(args.runs):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                cmd, src = commands[name]
                results[name].append(timed(cmd, environment(src)))
        load_after = os.getloadavg()

        print(f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
              f"{args.runs} runs each, medians; index {index} ({'given' if args.index else 'scikit-image photos'})")
        print(f"{'command':<44} {'wall ms':>8} {'CPU ms':>8} {'peak MB':>8}")
        for name in names:
            walls, cpus, rss = zip(*results[name])
            print(f"{name:<44} {statistics.median(walls) * 1000:8.0f} {statistics.median(cpus) * 1000:8.0f} "
                  f"{max(rss):8.0f}")
        for label, src in trees.items():
            cmd = ["-m", "imgsim.cli", "search", str(photo), "--index", str(index)]
            shares = import_breakdown(cmd, environment(src))
            top = sorted(shares.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{name} {ms:.0f}" for name, ms in top[:9])
            print(f"imports of `imgsim search` [{label}]: {sum(shares.values()):.0f} ms in all (median of 3; "
                  f"-X importtime, self times by package): {shown}")


if __name__ == "__main__":
    main()
