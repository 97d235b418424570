#!/usr/bin/env python
"""ONNX Runtime CPU latency: ResNet-50 v1 with SN (naive export, sn_deploy) vs the BN network.

All figures are ratios measured side by side in one process: the sessions run alternately, each
repeat times every variant once, and the medians are compared.  Thread spinning is off so one
session's idle workers do not steal time from the next.  The sn_deploy forms are timed as
``sn-export`` writes them (SN→ReLU and residual Add→ReLU folded into the SN nodes) and, in the
``*_relu_only`` columns, with the residual Adds left as graph ops.  Also one SN layer against a
copy of its input into a preallocated buffer (the memory-traffic floor).

    python scripts/bench_cpu.py [--repeats 30] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sn_deploy.export import _quiet_exporter, export_sn_onnx  # noqa: E402
from sn_deploy.models import build_model  # noqa: E402
from sn_deploy.nn import SwitchNorm2d  # noqa: E402
from sn_deploy.passes.decompose import decompose_model  # noqa: E402
from sn_deploy.passes.fuse import fuse_model, fused_residual_layers  # noqa: E402
from sn_deploy.runtime.onnxruntime import (  # noqa: E402
    create_session, native_op_library, nchwc_block_size, optimize_for_this_cpu)

from bench_models import bn_twin as _bn_twin, randomize as _randomize  # noqa: E402


def _plain_export(model: torch.nn.Module, shape) -> onnx.ModelProto:
    """torch.onnx's own lowering of the model (SN becomes whatever ops its forward traces to)."""
    import warnings

    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (torch.randn(shape),), dynamo=True, opset_version=18,
                                 input_names=["input"]).model_proto


def _time_alternating(runners: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _session_runner(model: onnx.ModelProto, x: np.ndarray, threads: int):
    sess = create_session(model, threads=threads, spinning=False)
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def bench_resnet50(repeats: int, threads: int) -> list[dict]:
    sn_model = _randomize(build_model("resnetv1sn50"))
    bn_model = _bn_twin(sn_model)
    results = []
    for batch in (1, 8):
        shape = (batch, 3, 224, 224)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        exported = export_sn_onnx(sn_model, shape)
        sn_onnx = fuse_model(exported)  # as sn-export writes it
        relu_only = fuse_model(exported, residual=False)
        forms = {
            "bn_folded": _plain_export(bn_model, shape),
            "sn_naive_export": _plain_export(sn_model, shape),
            "sn_deploy": decompose_model(sn_onnx),
            "sn_deploy_relu_only": decompose_model(relu_only),
        }
        if native_op_library() is not None:
            forms["sn_deploy_native_op"] = sn_onnx
            forms["sn_deploy_native_op_relu_only"] = relu_only
            if nchwc_block_size():
                forms["sn_deploy_cpu_nchwc"] = optimize_for_this_cpu(sn_onnx)  # model.cpu.onnx
        runners = {k: _session_runner(m, x, threads) for k, m in forms.items()}
        med = _time_alternating(runners, repeats)
        results.append({
            "batch": batch,
            "residual_fused_layers": len(fused_residual_layers(sn_onnx)),
            "latency_ms": {k: v * 1e3 for k, v in med.items()},
            "ratio_vs_bn": {k: med[k] / med["bn_folded"] for k in med},
        })
    return results


def _nchwc_layer_runner(sn_onnx: onnx.ModelProto, x: np.ndarray, threads: int):
    """One SN layer as model.cpu.onnx runs it: on an NCHWc tensor, no reorders around it."""
    import onnx_graphsurgeon as gs

    from sn_deploy.passes.nchwc import NCHWC_DOMAIN, keep_sn_in_nchwc_model

    block = nchwc_block_size()
    graph = gs.import_onnx(sn_onnx)
    node = next(n for n in graph.nodes if n.op == "SwitchableNorm")
    x_blocked = gs.Variable("input_nchwc", dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("ReorderOutput", domain=NCHWC_DOMAIN, inputs=[x_blocked],
                               outputs=[node.inputs[0]],
                               attrs={"channels": x.shape[1], "channels_last": 0}))
    graph.inputs = [x_blocked]
    y = node.outputs[0]
    y_blocked = gs.Variable("output_nchwc", dtype=np.float32)
    graph.nodes.append(gs.Node("ReorderInput", domain=NCHWC_DOMAIN, inputs=[y],
                               outputs=[y_blocked], attrs={"channels_last": 0}))
    graph.outputs = [y_blocked]
    model = gs.export_onnx(graph.cleanup().toposort())
    model.opset_import.append(onnx.helper.make_opsetid(NCHWC_DOMAIN, 1))
    model.ir_version = sn_onnx.ir_version
    sess = create_session(keep_sn_in_nchwc_model(model, block), threads=threads)
    from sn_deploy.ops import to_nchwc

    xb = to_nchwc(x, block)
    return lambda: sess.run(None, {"input_nchwc": xb})


def _single_sn_model(shape) -> onnx.ModelProto:
    layer = torch.nn.Sequential(SwitchNorm2d(shape[1]))
    _randomize(layer)
    return export_sn_onnx(layer, shape)


def _native_ops():
    """The compiled CPU kernel, when it is built (issue: native kernels)."""
    try:
        from sn_deploy import ops
    except ImportError:
        return None
    return ops if ops.available() else None


def bench_single_layer(repeats: int, threads: int) -> list[dict]:
    results = []
    for shape in ((8, 64, 56, 56), (16, 64, 112, 112)):
        x = np.random.default_rng(0).normal(1.0, 2.0, size=shape).astype(np.float32)
        buf = np.empty_like(x)
        sn_onnx = _single_sn_model(shape)
        runners = {
            "copy": lambda: np.copyto(buf, x),
            "sn_decomposed_ort": _session_runner(decompose_model(sn_onnx), x, threads),
        }
        if native_op_library() is not None:
            runners["sn_native_op_ort"] = _session_runner(sn_onnx, x, threads)
            if nchwc_block_size():  # the layer between two reorders of onnxruntime's own
                runners["sn_nchwc_op_ort"] = _nchwc_layer_runner(sn_onnx, x, threads)
        ops = _native_ops()
        if ops is not None:
            c = shape[1]
            one, zero = np.ones(c, np.float32), np.zeros(c, np.float32)
            w = np.array([0.3, 0.3, 0.4], np.float32)
            y = np.empty_like(x)
            runners["sn_native_cpu_kernel"] = lambda: ops.switchable_norm_cpu(
                x, one, zero, zero, one, w, w, 1e-5, num_threads=threads, out=y)
        med = _time_alternating(runners, repeats)
        nbytes = x.nbytes
        results.append({
            "shape": "x".join(map(str, shape)),
            "time_ms": {k: v * 1e3 for k, v in med.items()},
            "ratio_vs_copy": {k: med[k] / med["copy"] for k in med},
            "copy_GBps": 2 * nbytes / med["copy"] / 1e9,
        })
    return results


def _moments_graph(one_pass: bool, shape) -> onnx.ModelProto:
    """Per-plane variance in float32 the one-pass way (E[x²] − E[x]²) or the two-pass way."""
    from onnx import TensorProto, helper

    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"])]
    if one_pass:
        nodes += [helper.make_node("Mul", ["x", "x"], ["xx"]),
                  helper.make_node("ReduceMean", ["xx", "axes"], ["m2"]),
                  helper.make_node("Mul", ["m", "m"], ["mm"]),
                  helper.make_node("Sub", ["m2", "mm"], ["var"])]
    else:
        nodes += [helper.make_node("Sub", ["x", "m"], ["d"]),
                  helper.make_node("Mul", ["d", "d"], ["dd"]),
                  helper.make_node("ReduceMean", ["dd", "axes"], ["var"])]
    n, c, l = shape
    graph = helper.make_graph(
        nodes, "moments", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, l])],
        [helper.make_tensor_value_info("var", TensorProto.FLOAT, [n, c, 1])], initializer=[axes])
    # IR 9: what onnxruntime 1.31 reads (onnx 1.23 would write 14)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def bench_variance_accuracy() -> list[dict]:
    """Why the decomposition pays for a second pass: relative error of the per-plane variance,
    float32 in onnxruntime vs float64, on inputs whose mean is `offset` times their std."""
    shape = (2, 64, 56 * 56)
    sessions = {name: create_session(_moments_graph(name == "one_pass", shape), threads=1)
                for name in ("one_pass", "two_pass")}
    rows = []
    for offset in (0, 10, 100, 1000):
        x = (offset + np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
        truth = x.astype(np.float64).var(axis=2, keepdims=True)
        row = {"mean_over_std": offset}
        for name, sess in sessions.items():
            got = sess.run(None, {"x": x})[0].astype(np.float64)
            row[f"{name}_max_rel_error"] = float(np.max(np.abs(got - truth) / truth))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "threads": args.threads,
        "repeats": args.repeats,
        "resnet50": bench_resnet50(args.repeats, args.threads),
        "single_layer": bench_single_layer(args.repeats, args.threads),
        "variance_accuracy": bench_variance_accuracy(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"ResNet-50 v1, ONNX Runtime CPU, {args.threads} threads, median of {args.repeats}")
    for r in report["resnet50"]:
        parts = ", ".join(f"{k} {v:.2f} ms ({r['ratio_vs_bn'][k]:.2f}x)"
                          for k, v in r["latency_ms"].items())
        print(f"  batch {r['batch']} ({r['residual_fused_layers']} residual Adds fused): {parts}")
    print("\nOne SN layer vs np.copyto into a preallocated buffer")
    for r in report["single_layer"]:
        parts = ", ".join(f"{k} {v:.3f} ms ({r['ratio_vs_copy'][k]:.2f}x)"
                          for k, v in r["time_ms"].items())
        print(f"  {r['shape']}: {parts}; copy {r['copy_GBps']:.1f} GB/s")
    print("\nPer-plane variance in float32 (onnxruntime) vs float64, max relative error")
    for r in report["variance_accuracy"]:
        print(f"  mean = {r['mean_over_std']:>4} std: one-pass E[x^2]-E[x]^2 "
              f"{r['one_pass_max_rel_error']:.1e}, two-pass (sn_deploy) "
              f"{r['two_pass_max_rel_error']:.1e}")


if __name__ == "__main__":
    main()
