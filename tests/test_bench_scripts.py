"""The benchmark scripts run and report every figure they promise (CPU part; GPU rows need one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sn_deploy import ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not ops.available(), reason="libsn_cpu.so cannot be built here")
def test_bench_kernels_json():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"),
                           "--repeats", "2", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    cpu = [r for r in report["kernels"] if r["device"] == "cpu"]
    assert {(r["shape"], r["dtype"]) for r in cpu} == {
        (s, d) for s in ("8x64x56x56", "16x64x112x112") for d in ("float32", "float16")}
    for r in cpu:
        assert r["sn_ms"] > 0 and r["copy_ms"] > 0 and r["ratio"] == pytest.approx(
            r["sn_ms"] / r["copy_ms"])
    assert isinstance(report["resnet50_gpu"], list)
