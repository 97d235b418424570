"""SwitchableNorm_TRT: builds against TensorRT headers, exports the loader entry points, needs no
libnvinfer, and round-trips its fields; engine tests run only where TensorRT and a GPU exist."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sn_deploy import ops

BUILD = ops.plugin_dir()
PLUGIN = BUILD / "libsn_trt_plugin.so"
HOST_TEST = BUILD / "sn_trt_plugin_host_test"
ROOT = Path(__file__).resolve().parents[1]

needs_plugin = pytest.mark.skipif(
    not PLUGIN.is_file(),
    reason="libsn_trt_plugin.so not built (needs nvcc and TensorRT headers: make plugins)")


def _symbols(path: Path, flag: str) -> set[str]:
    out = subprocess.run(["nm", "-D", flag, str(path)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


@needs_plugin
@pytest.mark.parametrize("lib", ["libsn_trt_plugin.so", "libsn_trt_plugin_preload.so"])
def test_exports_loader_entry_points_without_libnvinfer(lib):
    path = BUILD / lib
    defined = _symbols(path, "--defined-only")
    assert {"getCreators", "setLoggerFinder"} <= defined
    needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed and "libcudart" not in needed and "libcuda.so" not in needed


@needs_plugin
def test_preload_variant_registers_at_load_time():
    assert "getPluginRegistry" in _symbols(BUILD / "libsn_trt_plugin_preload.so", "--undefined-only")
    assert "getPluginRegistry" not in _symbols(PLUGIN, "--undefined-only")


@needs_plugin
def test_host_checks_and_serialization_round_trip():
    proc = subprocess.run([str(HOST_TEST)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all plugin host checks passed" in proc.stdout


def _trt11_headers() -> Path | None:
    env = os.environ.get("TENSORRT11_INCLUDE_DIR")
    for cand in ([Path(env)] if env else []) + [ROOT / "third_party" / "tensorrt" / "include"]:
        if (cand / "NvInferRuntime.h").is_file():
            return cand
    return None


@pytest.mark.skipif(_trt11_headers() is None or shutil.which("nvcc") is None,
                    reason="TensorRT 11 headers not present (fetch NVIDIA/TensorRT include/ into "
                           "third_party/tensorrt or set TENSORRT11_INCLUDE_DIR)")
def test_builds_against_tensorrt_11(tmp_path):
    build = tmp_path / "b"
    subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(build),
                    f"-DTENSORRT_INCLUDE_DIR={_trt11_headers()}"], check=True, capture_output=True)
    proc = subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "sn_trt_plugin_host_test"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = subprocess.run([str(build / "sn_trt_plugin_host_test")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def _tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the bindings' own load errors
        return f"tensorrt is not importable ({type(exc).__name__})"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=str(_tensorrt_and_gpu()))
def test_engine_parity(tmp_path):
    import numpy as np
    import torch

    from sn_deploy.export import export_sn_onnx, save_model_atomic
    from sn_deploy.models import build_model
    from sn_deploy.passes.to_plugin import to_plugin_model
    from sn_deploy.runtime.tensorrt import EngineRunner, build_engine
    from tests.conftest import randomize_sn

    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    onnx_path = save_model_atomic(to_plugin_model(export_sn_onnx(model, (2, 3, 64, 64))),
                                  tmp_path / "m.trt.onnx")
    plan = build_engine(onnx_path, PLUGIN, tmp_path / "m.plan")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = EngineRunner(plan, PLUGIN).run({"input": x})["output"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
