"""Load-test `imgsim serve` on this machine: N concurrent clients posting real photos to POST /search,
against the same searches done in-process (`Index.search` on the same files) as the baseline.

    python scripts/bench_serve.py [--index PATH] [--clients 1 4 8] [--seconds 10] [--max-requests 5000] [-k 10]

Without --index, the sample photos (scripts/sample_photos.py) are indexed into a temporary folder
with the default model, and their altered copies are the queries. The server runs as its own process
(`imgsim serve`) on 127.0.0.1 only; every run is bounded by --seconds and --max-requests, and the
clients run in this process (threads, one keep-alive connection each), so they share the machine's
cores with the server, as a local web page's users would not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from itertools import cycle
from pathlib import Path

from imgsim import Index

HOST = "127.0.0.1"  # loopback only, by design: nothing here may target another address
MAX_CLIENTS = 64
MAX_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def report(label: str, latencies: list[float], seconds: float, errors: int, quiet: bool = False) -> dict:
    done = len(latencies)
    row = {"mode": label, "requests": done, "errors": errors, "req_per_s": done / seconds if seconds else 0.0,
           "p50_ms": percentile(latencies, 50) * 1000 if done else float("nan"),
           "p99_ms": percentile(latencies, 99) * 1000 if done else float("nan")}
    if not quiet:
        print(f"{label:<28} {done:>7} {row['req_per_s']:>9.1f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} "
              f"{errors:>7}", flush=True)
    return row


def in_process(index_path: str, queries: list[Path], k: int, seconds: float, max_requests: int,
               label: str = "in-process Index.search") -> dict:
    """The baseline: the same searches through `Index.search`, one after another, in this process."""
    with Index.open(index_path, read_only=True) as index:
        index.search(queries[0], k=k)  # load the model and the graph outside the timing
        latencies = []
        start = time.perf_counter()
        for query in cycle(queries):
            if len(latencies) >= max_requests or time.perf_counter() - start > seconds:
                break
            t = time.perf_counter()
            index.search(query, k=k)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
    return report(label, latencies, elapsed, 0)


def over_http(port: int, payloads: list[tuple[bytes, str]], clients: int, k: int, seconds: float,
              max_requests: int, quiet: bool = False) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    issued = [0]
    start = time.perf_counter()
    deadline = start + seconds

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        mine = cycle(payloads[offset % len(payloads):] + payloads[:offset % len(payloads)])
        while time.perf_counter() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    break
                issued[0] += 1
            body, content_type = next(mine)
            t = time.perf_counter()
            try:
                conn.request("POST", f"/search?limit={k}", body=body, headers={"Content-Type": content_type})
                response = conn.getresponse()
                answer = response.read()
                ok = response.status == 200 and len(json.loads(answer)["results"]) > 0
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
            elapsed = time.perf_counter() - t
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return report(f"HTTP, {clients} client{'s' if clients > 1 else ''}", latencies, time.perf_counter() - start,
                  errors[0], quiet)


def start_server(index_path: str, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "IMGSIM_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "imgsim.cli", "-q", "serve", "--index", index_path,
                               "--host", HOST, "--port", str(port)], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.2)
        if server.poll() is not None:
            break
    server.kill()
    raise SystemExit("imgsim serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="An existing index (default: index the sample photos in a temporary folder)")
    parser.add_argument("--queries", type=Path, help="Folder of query images (default: the sample queries)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="Per configuration")
    parser.add_argument("--max-requests", type=int, default=5000, help="Per configuration")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    if max(args.clients) > MAX_CLIENTS or args.seconds > MAX_SECONDS or min(args.clients) < 1:
        raise SystemExit(f"keep it bounded: 1..{MAX_CLIENTS} clients, at most {MAX_SECONDS} s per configuration")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        index_path, queries_dir = args.index, args.queries
        if index_path is None or queries_dir is None:
            subprocess.run([sys.executable, str(Path(__file__).with_name("sample_photos.py")), f"{tmp}/samples"],
                           check=True, capture_output=True)
            queries_dir = queries_dir or Path(tmp, "samples", "queries")
        if index_path is None:
            index_path = f"{tmp}/bench"
            with Index.create(index_path) as index:
                index.add(Path(tmp, "samples", "photos"))
        queries = sorted(p for p in Path(queries_dir).iterdir() if p.is_file())
        payloads = [multipart(q.read_bytes(), q.name) for q in queries]
        with Index.open(index_path, read_only=True) as index:
            info = index.info()
        print(f"index: {info['count']} images, {info['model']}; {len(queries)} query photos, k={args.k}; "
              f"{os.cpu_count()} CPUs; at most {args.seconds:g} s or {args.max_requests} requests per line")
        print(f"{'mode':<28} {'requests':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
        rows = [in_process(index_path, queries, args.k, args.seconds, args.max_requests)]
        port = free_port()
        server = start_server(index_path, port)
        try:
            over_http(port, payloads[:2], 1, args.k, 2.0, 20, quiet=True)  # warm-up
            for clients in args.clients:
                rows.append(over_http(port, payloads, clients, args.k, args.seconds, args.max_requests))
        finally:
            server.terminate()
            server.wait(timeout=15)
        # Again after: on a shared machine, the spread between the two says how noisy the figures are.
        after = in_process(index_path, queries, args.k, args.seconds, args.max_requests, "in-process, again after")
        base = rows[0]["p50_ms"]
        print(f"baseline p50 {rows[0]['p50_ms']:.1f} ms before, {after['p50_ms']:.1f} ms after the HTTP runs")
        for row in rows[1:]:
            print(f"{row['mode']}: p50 is {row['p50_ms'] / base:.2f}x the in-process search's, "
                  f"{row['req_per_s'] / rows[0]['req_per_s']:.2f}x its throughput")


if __name__ == "__main__":
    main()
