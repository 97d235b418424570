#!/usr/bin/env python
"""Native SN kernels vs a plain copy of the same tensor into a preallocated buffer.

SN reads its input twice (moments, apply) and writes once; a copy reads once and writes once, so
~1.5x a copy is the floor. Medians of alternating repeats, in one process.

    python scripts/bench_kernels.py [--repeats 50] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sn_deploy import ops  # noqa: E402
from sn_deploy.nn import SwitchNorm2d  # noqa: E402

SHAPES = [(8, 64, 56, 56), (16, 64, 112, 112)]


def _median_pair(a, b, repeats, sync=lambda: None):
    for _ in range(3):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _weights(c):
    return np.ones(c, np.float32), np.zeros(c, np.float32), np.array([0.3, 0.3, 0.4], np.float32)


def bench_cpu(repeats, threads):
    rows = []
    for shape in SHAPES:
        for dtype in (np.float32, np.float16):
            x = np.random.default_rng(0).normal(1, 2, size=shape).astype(dtype)
            y, buf = np.empty_like(x), np.empty_like(x)
            one, zero, w = _weights(shape[1])
            sn = lambda: ops.switchable_norm_cpu(x, one, zero, zero, one, w, w, 1e-5,  # noqa: E731
                                                 num_threads=threads, out=y)
            t_sn, t_copy = _median_pair(sn, lambda: np.copyto(buf, x), repeats)
            rows.append(_row("cpu", shape, dtype, x.nbytes, t_sn, t_copy))
    return rows


def bench_gpu(repeats):
    import torch

    import ctypes

    lib = ctypes.CDLL(str(ops.library_path("sn_cuda")))
    lib.sn_cuda_workspace_size.restype = ctypes.c_size_t
    lib.sn_cuda_workspace_size.argtypes = [ctypes.c_int64] * 3
    rows = []
    for shape in SHAPES:
        for dtype, tdtype, code in ((np.float32, torch.float32, 0), (np.float16, torch.float16, 1)):
            c = shape[1]
            one, zero, w = _weights(c)
            params, _ = ops.make_params(shape, one, zero, zero, one, w, w, 1e-5, False)
            dev = {k: torch.from_numpy(v).cuda() for k, v in
                   (("scale", one), ("bias", zero), ("running_mean", zero), ("running_var", one))}
            for k, t in dev.items():
                setattr(params, k, t.data_ptr())
            x = torch.randn(shape, device="cuda", dtype=tdtype)
            y, buf = torch.empty_like(x), torch.empty_like(x)
            L = int(np.prod(shape[2:]))
            ws = torch.empty(lib.sn_cuda_workspace_size(shape[0], c, L), dtype=torch.uint8,
                             device="cuda")
            stream = torch.cuda.current_stream().cuda_stream
            sn = lambda: lib.sn_forward_cuda(ctypes.byref(params), code,  # noqa: E731
                                             ctypes.c_void_p(x.data_ptr()),
                                             ctypes.c_void_p(y.data_ptr()),
                                             ctypes.c_void_p(ws.data_ptr()), ctypes.c_void_p(stream))
            t_sn, t_copy = _median_pair(sn, lambda: buf.copy_(x), repeats, torch.cuda.synchronize)
            row = _row("gpu", shape, dtype, x.numel() * x.element_size(), t_sn, t_copy)
            eager = SwitchNorm2d(c).to(device="cuda", dtype=tdtype).eval()
            with torch.no_grad():
                t_eager, _ = _median_pair(lambda: eager(x), lambda: None, repeats,
                                          torch.cuda.synchronize)
            row["torch_eager_sn_ms"] = t_eager * 1e3
            row["speedup_vs_torch_eager"] = t_eager / t_sn
            rows.append(row)
    return rows


def _row(device, shape, dtype, nbytes, t_sn, t_copy):
    return {"device": device, "shape": "x".join(map(str, shape)), "dtype": np.dtype(dtype).name,
            "sn_ms": t_sn * 1e3, "copy_ms": t_copy * 1e3, "ratio": t_sn / t_copy,
            "sn_GBps": 3 * nbytes / t_sn / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = bench_cpu(args.repeats, args.threads)
    try:
        import torch

        if torch.cuda.is_available() and ops.library_path("sn_cuda").is_file():
            rows += bench_gpu(args.repeats)
    except ImportError:
        pass
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("SN kernel vs copy into a preallocated buffer (GB/s counts 3 passes for SN, 2 for copy)")
    for r in rows:
        print(f"  {r['device']} {r['shape']:>15} {r['dtype']:>7}: SN {r['sn_ms']:7.3f} ms "
              f"({r['sn_GBps']:5.1f} GB/s), copy {r['copy_ms']:7.3f} ms ({r['copy_GBps']:5.1f} GB/s), "
              f"ratio {r['ratio']:.2f}x"
              + (f", {r['speedup_vs_torch_eager']:.1f}x faster than torch eager SN"
                 if "speedup_vs_torch_eager" in r else ""))


if __name__ == "__main__":
    main()
