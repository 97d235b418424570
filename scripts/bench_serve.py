#!/usr/bin/env python
"""sn-serve throughput and latency on loopback vs calling the ONNX Runtime session directly.

Starts ``sn-serve`` as its own process on a free loopback port with a ResNet-18-SN model, then for
each concurrency level runs closed-loop tritonclient workers for a fixed time. The direct baseline
runs the same session on batches of the same total size, in the same process and run.

    python scripts/bench_serve.py [--seconds 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sn_deploy.export import export_sn_onnx, save_model_atomic  # noqa: E402
from sn_deploy.models import build_model  # noqa: E402
from sn_deploy.passes.decompose import decompose_model  # noqa: E402
from sn_deploy.runtime.onnxruntime import create_session  # noqa: E402


def _demo_repo(root: Path) -> tuple[Path, tuple[int, ...]]:
    model = build_model("resnetv1sn18", num_classes=10).eval()
    shape = (1, 3, 64, 64)
    (root / "resnet" / "1").mkdir(parents=True)
    save_model_atomic(decompose_model(export_sn_onnx(model, shape, dynamic_batch=True)),
                      root / "resnet" / "1" / "model.onnx")
    return root, shape


def _closed_loop(port: int, name: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    import tritonclient.http as httpclient

    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker():
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            c.infer(name, [inp])
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {"concurrency": clients, "requests_per_s": len(lat) / elapsed,
            "p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[int(len(lat) * 0.99) - 1]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, timeout: float = 60.0) -> None:
    import tritonclient.http as httpclient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_ready():
                return
        except Exception:  # not listening yet
            time.sleep(0.2)
    raise SystemExit("sn-serve did not become ready")


def _direct(model_path: Path, x: np.ndarray, batch: int, seconds: float, threads: int) -> float:
    sess = create_session(model_path, threads=threads)
    xb = np.concatenate([x] * batch)
    sess.run(None, {"input": xb})
    n, stop = 0, time.monotonic() + seconds
    start = time.perf_counter()
    while time.monotonic() < stop:
        sess.run(None, {"input": xb})
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="sn-serve --threads (per worker)")
    ap.add_argument("--direct-threads", type=int, default=2,
                    help="onnxruntime threads of the direct baseline (all cores)")
    ap.add_argument("--workers", type=int, default=2, help="sn-serve --workers")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="sn-serve --max-queue-delay-ms")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo, shape = _demo_repo(Path(tmp))
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        port = _free_port()
        exe = Path(sys.executable).with_name("sn-serve")
        srv = subprocess.Popen([str(exe), str(repo), "--port", str(port), "--max-batch-size", "32",
                                "--max-queue-delay-ms", str(args.delay_ms), "--threads", str(args.threads),
                                "--workers", str(args.workers),
                                "--quiet"], stderr=subprocess.DEVNULL)
        try:
            _wait_ready(port)
            rows = []
            for clients in (1, 8, 32):
                row = _closed_loop(port, "resnet", x, clients, args.seconds)
                row["direct_samples_per_s"] = _direct(repo / "resnet" / "1" / "model.onnx", x,
                                                      clients, args.seconds, args.direct_threads)
                row["ratio_vs_direct"] = row["requests_per_s"] / row["direct_samples_per_s"]
                rows.append(row)
        finally:
            srv.terminate()
            srv.wait(timeout=30)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"sn-serve on loopback (resnetv1sn18 at 1x3x64x64 per request; --workers {args.workers} "
          f"--threads {args.threads}) vs direct session calls ({args.direct_threads} threads) on "
          "batches of the same size")
    for r in rows:
        print(f"  concurrency {r['concurrency']:>2}: {r['requests_per_s']:7.1f} req/s, "
              f"p50 {r['p50_ms']:6.2f} ms, p99 {r['p99_ms']:6.2f} ms; direct "
              f"{r['direct_samples_per_s']:7.1f} samples/s; ratio {r['ratio_vs_direct']:.2f}x")


if __name__ == "__main__":
    main()
