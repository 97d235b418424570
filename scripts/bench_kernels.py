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
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


#: GPU shapes: the two CPU ones (in the H100's 50 MB L2 or about its size) and one far beyond it
GPU_SHAPES = SHAPES + [(64, 256, 56, 56)]


def _cuda_median_ms(fn, repeats: int, iters: int = 20) -> float:
    """Median over ``repeats`` of CUDA-event time per call, ``iters`` back-to-back calls each
    (launch overhead included, as in an engine; host timers would mostly measure the sync)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / iters)
    return statistics.median(times)


def bench_gpu(repeats):
    """CUDA kernel vs a device copy, torch eager SN and cuDNN BatchNorm (what BN costs)."""
    import torch
    import torch.nn.functional as F

    rows = []
    for shape in GPU_SHAPES:
        for dtype, tdtype in ((np.float32, torch.float32), (np.float16, torch.float16)):
            c = shape[1]
            one, zero, w = _weights(c)
            sn = ops.CudaSwitchableNorm(shape, tdtype == torch.float16, one, zero, zero, one, w, w)
            x = torch.randn(shape, device="cuda", dtype=tdtype)
            y, buf = torch.empty_like(x), torch.empty_like(x)
            eager = SwitchNorm2d(c).to(device="cuda", dtype=tdtype).eval()
            gamma = torch.ones(c, device="cuda", dtype=tdtype)
            stats = torch.zeros(c, device="cuda", dtype=tdtype), torch.ones(c, device="cuda", dtype=tdtype)
            with torch.no_grad():
                t = {
                    "sn": _cuda_median_ms(lambda: sn(x, out=y), repeats),
                    "copy": _cuda_median_ms(lambda: buf.copy_(x), repeats),
                    "eager": _cuda_median_ms(lambda: eager(x), repeats),
                    "bn": _cuda_median_ms(lambda: F.batch_norm(x, *stats, gamma, gamma, False),
                                          repeats),
                }
            row = _row("gpu", shape, dtype, x.numel() * x.element_size(), t["sn"] / 1e3,
                       t["copy"] / 1e3)
            row["torch_eager_sn_ms"] = t["eager"]
            row["speedup_vs_torch_eager"] = t["eager"] / t["sn"]
            row["torch_batchnorm_ms"] = t["bn"]
            row["ratio_vs_batchnorm"] = t["sn"] / t["bn"]
            rows.append(row)
    return rows


def _kernel_backed(sn_model, half: bool):
    """The SN ResNet with every SwitchNorm2d running on the CUDA kernel (fused ReLU/residual not
    used: torch's own ReLU and Add follow, as in the eager model)."""
    import copy
    import types

    from sn_deploy.nn import switch_norm_layers

    model = copy.deepcopy(sn_model)

    def forward(self, x):
        sn = self._kernels.get(tuple(x.shape))
        if sn is None:
            mw, vw = (w.detach().float().cpu().numpy() for w in self.mixing_weights())
            per_c = lambda t: t.detach().float().reshape(-1).cpu().numpy()  # noqa: E731
            sn = ops.CudaSwitchableNorm(x.shape, half, per_c(self.weight), per_c(self.bias),
                                        per_c(self.running_mean), per_c(self.running_var),
                                        mw, vw, self.eps)
            self._kernels[tuple(x.shape)] = sn
        return sn(x.contiguous())

    for _, m in switch_norm_layers(model):
        m._kernels = {}
        m.forward = types.MethodType(forward, m)
    return model


def bench_resnet50_gpu(repeats: int) -> list[dict]:
    """ResNet-50 v1 inference in PyTorch on the GPU: BN folded vs SN eager vs SN on the kernel."""
    import torch

    from bench_models import bn_twin, randomize
    from sn_deploy.models import build_model

    torch.backends.cudnn.benchmark = True
    sn_cpu = randomize(build_model("resnetv1sn50"))
    bn_cpu = bn_twin(sn_cpu)
    rows = []
    for tdtype in (torch.float16, torch.float32):
        half = tdtype == torch.float16
        models = {"bn_folded": bn_cpu, "sn_torch_eager": sn_cpu}
        models = {k: copy_to(m, tdtype) for k, m in models.items()}
        models["sn_cuda_kernel"] = _kernel_backed(models["sn_torch_eager"], half)
        for batch in (1, 8, 32):
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=tdtype)
            with torch.no_grad():
                t = {k: _cuda_median_ms(lambda m=m: m(x), repeats, iters=5) for k, m in models.items()}
                for k in ("bn_folded", "sn_cuda_kernel"):
                    t[k + "_cuda_graph"] = _cuda_median_ms(_graphed(models[k], x), repeats, iters=5)
                ref = models["sn_torch_eager"](x).float()
                err = (models["sn_cuda_kernel"](x).float() - ref).abs().max().item()
            rows.append({"dtype": str(tdtype).replace("torch.", ""), "batch": batch,
                         "latency_ms": t, "ratio_vs_bn": {k: v / t["bn_folded" + (
                             "_cuda_graph" if k.endswith("_cuda_graph") else "")]
                             for k, v in t.items()},
                         "kernel_vs_eager_max_abs_diff": err})
    return rows


def _graphed(model, x):
    """``model(x)`` captured in a CUDA graph: host overhead gone, as in a TensorRT engine.

    The SN kernels (their own statically linked CUDA runtime) launch on torch's current stream,
    which is the capture stream here, so they are captured with the convolutions."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: cuDNN algorithm choice, SN parameter upload
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def copy_to(model, dtype):
    import copy

    return copy.deepcopy(model).to(device="cuda", dtype=dtype).eval()


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
    resnet = []
    try:
        import torch

        if torch.cuda.is_available() and ops.library_path("sn_cuda").is_file():
            rows += bench_gpu(args.repeats)
            resnet = bench_resnet50_gpu(max(5, args.repeats // 5))
    except ImportError:
        pass
    if args.json:
        print(json.dumps({"kernels": rows, "resnet50_gpu": resnet}, indent=2))
        return
    print("SN kernel vs copy into a preallocated buffer (GB/s counts 3 passes for SN, 2 for copy)")
    for r in rows:
        print(f"  {r['device']} {r['shape']:>15} {r['dtype']:>7}: SN {r['sn_ms']:7.3f} ms "
              f"({r['sn_GBps']:5.1f} GB/s), copy {r['copy_ms']:7.3f} ms ({r['copy_GBps']:5.1f} GB/s), "
              f"ratio {r['ratio']:.2f}x"
              + (f", {r['speedup_vs_torch_eager']:.1f}x faster than torch eager SN, "
                 f"{r['ratio_vs_batchnorm']:.2f}x cuDNN BatchNorm"
                 if "speedup_vs_torch_eager" in r else ""))
    if resnet:
        print("\nResNet-50 v1 in PyTorch on the GPU (CUDA events, median), ratio to BN folded")
        for r in resnet:
            parts = ", ".join(f"{k} {v:.2f} ms ({r['ratio_vs_bn'][k]:.2f}x)"
                              for k, v in r["latency_ms"].items())
            print(f"  {r['dtype']} batch {r['batch']}: {parts}; kernel vs eager max diff "
                  f"{r['kernel_vs_eager_max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
