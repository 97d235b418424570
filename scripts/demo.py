#!/usr/bin/env python
"""``make demo``: the whole sn_deploy job on scikit-learn's digits, end to end, with the real CLIs.

1. train a small SN CNN for real (digits ship inside scikit-learn: no download) and save it as an
   official-format checkpoint (``{'epoch','state_dict','best_prec1','optimizer'}``, ``module.`` keys);
2. ``sn-calibrate``: batch-average BN statistics over training batches;
3. ``sn-export``: model.sn.onnx (custom op) + model.onnx (standard ops) + model.cpu.onnx (SN in
   onnxruntime's NCHWc layout, where the native op is built) + parity report;
4. ``sn-validate`` on the real test images, per layer;
5. test-set accuracy of PyTorch vs ONNX Runtime (every ONNX form written).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sn_deploy.models.demo import load_digits_split, train_demo_model  # noqa: E402


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def sh(*args: str) -> None:
    cmd = [_bin(args[0]), *args[1:]]
    print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        sys.exit(f"demo: '{args[0]}' exited with {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="demo_out")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    print("== 1. train a small SN CNN on scikit-learn digits (8x8 grayscale, 10 classes)")
    x_train, y_train, x_test, y_test = load_digits_split()
    t0 = time.perf_counter()
    model = train_demo_model(x_train, y_train, epochs=args.epochs, log=print)
    print(f"trained in {time.perf_counter() - t0:.1f} s on {len(x_train)} images")
    ckpt = out / "digits_sn.pth"
    torch.save({"epoch": args.epochs, "best_prec1": 0.0, "optimizer": {},
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    np.save(out / "digits_train.npy", x_train)
    np.save(out / "digits_test.npy", x_test)

    print("\n== 2. batch-average calibration of the BN branch")
    calibrated = out / "digits_sn_calibrated.pth"
    sh("sn-calibrate", str(ckpt), "--arch", "demo_sn_net", "--data", str(out / "digits_train.npy"),
       "--recipe", str(ROOT / "calibration" / "digits.yaml"), "--order", "random", "--seed", "0",
       "--output", str(calibrated), "--report", str(out / "calibration.json"))

    print("\n== 3. export: custom-op ONNX, standard-op ONNX, parity report")
    export_dir = out / "export"
    from sn_deploy.runtime.onnxruntime import native_op_library, nchwc_block_size

    cpu_form = native_op_library() is not None and nchwc_block_size() > 0
    sh("sn-export", str(calibrated), "--arch", "demo_sn_net", "--input-shape", "1x1x8x8",
       "--dynamic-batch", "--output-dir", str(export_dir), *(["--cpu-optimize"] if cpu_form else []))

    print("\n== 4. parity on the real test images, per SN layer")
    sh("sn-validate", str(calibrated), "--arch", "demo_sn_net",
       "--onnx", str(export_dir / "model.onnx"), "--onnx", str(export_dir / "model.sn.onnx"),
       "--inputs", str(out / "digits_test.npy"), "--per-layer",
       "--json", str(out / "validate_test.json"), "--html", str(out / "validate_test.html"))

    print("\n== 5. test-set accuracy: PyTorch vs ONNX Runtime")
    from sn_deploy.checkpoint import load_checkpoint
    from sn_deploy.runtime.onnxruntime import create_session

    torch_model = load_checkpoint(str(calibrated), "demo_sn_net").model.eval()
    with torch.no_grad():
        pred_torch = torch_model(torch.from_numpy(x_test)).argmax(1).numpy()
    rows = [("PyTorch (calibrated)", pred_torch)]
    for name in ("model.onnx", "model.sn.onnx") + (("model.cpu.onnx",) if cpu_form else ()):
        sess = create_session(export_dir / name)
        logits = sess.run(None, {sess.get_inputs()[0].name: x_test})[0]
        rows.append((f"ONNX Runtime {name}", logits.argmax(1)))
    for label, pred in rows:
        agree = (pred == pred_torch).mean()
        print(f"  {label:<28} accuracy {100 * (pred == y_test).mean():6.2f}%   "
              f"agreement with PyTorch {100 * agree:6.2f}%")
    if any((pred != pred_torch).any() for _, pred in rows):
        sys.exit("demo: ONNX Runtime predictions differ from PyTorch")
    print(f"\nall outputs in {out}/ (open {export_dir}/report.html for the per-layer chart)")


if __name__ == "__main__":
    main()
