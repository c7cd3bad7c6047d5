"""Model-only throughput of the installed catalogue models, under several onnxruntime settings.

    python scripts/bench_models.py [--models NAME ...] [--model-file NAME=PATH ...]
        [--batch 1 8 16 32] [--threads 1 2] [--opt basic extended all] [--spin on off] [--runs 5]

For each model, graph optimisation level, thread count, thread spinning and batch size it
creates an onnxruntime CPU session like imgsim's (``inter_op_num_threads=1``,
``intra_op_num_threads`` as given), feeds random float32 input at the model's input size, discards two warm-up batches, then
times ``--runs`` runs of at least ``--min-seconds`` each and reports the median images/s (and
the best run's). The runs go round-robin over all settings (run 1 of every setting, then run 2,
...), so that a burst of other work on the machine slows every setting alike instead of a few;
the load average is printed before and after, and ``spread`` ((max - min) / median) shows how
steady it was.
Decoding and preprocessing are not included. Then, for every model with an ``-int8`` twin in the
same run, the int8/fp32 throughput ratio at each setting, and the fastest setting per model.

Models are the catalogue's installed files (see ``imgsim models``; ``IMGSIM_MODELS`` adds a
folder), or files named with ``--model-file resnet50=/tmp/resnet50.onnx``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from imgsim.models import CATALOGUE, available_cpus, find_file, spec_for

OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
WARM_UP = 2


@dataclass
class Result:
    model: str
    opt: str
    threads: int
    spin: bool
    batch: int
    images_per_second: float
    """The median run's."""
    best: float
    """The fastest run's: nearer what an idle machine gives when other work competes."""
    spread: float
    """(max - min) / median of the runs' images/s."""


def session(path: Path, opt: str, threads: int, spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[opt]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:  # idle intra-op threads sleep instead of busy-waiting for the next parallel section
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_run(sess: ort.InferenceSession, feed: dict, min_seconds: float) -> float:
    """images/s of one run: the batch repeated until ``min_seconds`` have passed."""
    batch, done, start = len(feed["input"]), 0, time.perf_counter()
    while True:
        sess.run(["embedding"], feed)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def models_to_run(names: list[str] | None, files: list[str]) -> list[tuple[str, str, Path]]:
    """(label, catalogue name, file) to benchmark. The label is the catalogue name, or
    ``name[file]`` when several files of one model are compared in the same run."""
    chosen: list[tuple[str, Path]] = []
    for item in files:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"error: --model-file wants NAME=PATH of an existing file, not {item!r}")
        spec_for(name)  # an unknown name is an error
        chosen.append((name, Path(path)))
    given = {name for name, _ in chosen}
    for name in names or sorted(CATALOGUE):
        if name in given:
            continue
        path = find_file(spec_for(name))
        if path is not None:
            chosen.append((name, path))
        elif names:
            raise SystemExit(f"error: model {name} is not installed: {spec_for(name).how_to_get}")
    if not chosen:
        raise SystemExit("error: no catalogue model is installed")
    repeated = {name for name, _ in chosen if sum(n == name for n, _ in chosen) > 1}
    return [(f"{name}[{path.name}]" if name in repeated else name, name, path) for name, path in chosen]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv=None) -> int:
    cpus = available_cpus()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", metavar="NAME", help="catalogue names (default: all installed)")
    ap.add_argument("--model-file", action="append", default=[], metavar="NAME=PATH",
                    help="benchmark this file as catalogue model NAME (repeatable)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=sorted({1, cpus}),
                    help=f"intra-op thread counts (default: 1 and {cpus}, this machine's CPUs)")
    ap.add_argument("--opt", nargs="+", choices=list(OPT_LEVELS), default=["basic", "all"],
                    help="graph optimisation levels (default: basic all)")
    ap.add_argument("--spin", nargs="+", choices=["on", "off"], default=["on"],
                    help="intra-op thread spinning (onnxruntime's default: on); off helps when other "
                         "work (image decoding) shares the CPUs")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per setting; the median is reported")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="shortest timed run (default 1 s)")
    args = ap.parse_args(argv)
    chosen = models_to_run(args.models, args.model_file)
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, {cpus} CPUs available; random input, "
          f"{WARM_UP} warm-up batches, median of {args.runs} runs of >= {args.min_seconds:g} s", file=sys.stderr)
    print(f"load average before: {load_average()}", file=sys.stderr)
    settings = []  # (name, opt, threads, batch, session, feed)
    rng = np.random.default_rng(0)
    for name, model, path in chosen:
        size = spec_for(model).preprocess.size
        for opt in args.opt:
            for threads in args.threads:
                for spin in args.spin:
                    sess = session(path, opt, threads, spin == "on")
                    for batch in args.batch:
                        feed = {"input": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
                        for _ in range(WARM_UP):
                            sess.run(["embedding"], feed)
                        settings.append(((name, opt, threads, spin == "on", batch), sess, feed))
    rates: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    for run in range(args.runs):
        for i, (_, sess, feed) in enumerate(settings):
            rates[i].append(timed_run(sess, feed, args.min_seconds))
        print(f"run {run + 1}/{args.runs} done, load average {load_average()}", file=sys.stderr)
    results = []
    for i, (key, _, _) in enumerate(settings):
        median = statistics.median(rates[i])
        results.append(Result(*key, median, max(rates[i]), (max(rates[i]) - min(rates[i])) / median))
    print(f"onnxruntime {ort.__version__}, {cpus} CPUs, load average after: {load_average()}")
    spin = lambda r: "on" if r.spin else "off"
    print(table([[r.model, r.opt, str(r.threads), spin(r), str(r.batch), f"{r.images_per_second:.1f}",
                  f"{1000 * r.batch / r.images_per_second:.1f}", f"{r.best:.1f}", f"{r.spread:.0%}"]
                 for r in results],
                ["model", "opt", "threads", "spin", "batch", "images/s", "ms/batch", "best", "spread"]))
    by_key = {(r.model, r.opt, r.threads, spin(r), r.batch): r.images_per_second for r in results}
    ratios = [[f"{m}-int8 / {m}", *map(str, rest), f"{by_key[(m + '-int8', *rest)] / v:.2f}x"]
              for (m, *rest), v in by_key.items() if (m + "-int8", *rest) in by_key]
    if ratios:
        print()
        print(table(ratios, ["int8 vs fp32", "opt", "threads", "spin", "batch", "speed-up"]))
    print()
    best = {}
    for r in results:
        if r.model not in best or r.images_per_second > best[r.model].images_per_second:
            best[r.model] = r
    print(table([[r.model, r.opt, str(r.threads), spin(r), str(r.batch), f"{r.images_per_second:.1f}"]
                 for r in best.values()],
                ["fastest setting", "opt", "threads", "spin", "batch", "images/s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
