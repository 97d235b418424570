"""SwitchableNorm_TRT: builds against TensorRT 10 and 11 headers, exports only the loader entry
points, needs no libnvinfer, and round-trips its fields; engine tests run only where TensorRT and a
GPU exist; the engine CLI's paths that need neither run everywhere."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sn_deploy import ops
from sn_deploy.export import save_model_atomic
from sn_deploy.passes.to_plugin import to_plugin_model
from tests.test_decompose import ref, sn_model

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


def _assert_loadable_without_libnvinfer(path: Path) -> None:
    defined = _symbols(path, "--defined-only")
    assert {"getCreators", "setLoggerFinder"} <= defined
    assert not any(s.startswith("sn_") for s in defined), defined  # kernels' C API stays internal
    needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed and "libcudart" not in needed and "libcuda.so" not in needed


# ------------------------------------------------------------------ (a) the library, built here
@needs_plugin
@pytest.mark.parametrize("lib", ["libsn_trt_plugin.so", "libsn_trt_plugin_preload.so"])
def test_exports_loader_entry_points_without_libnvinfer(lib):
    _assert_loadable_without_libnvinfer(BUILD / lib)


@needs_plugin
def test_preload_variant_registers_at_load_time():
    assert "getPluginRegistry" in _symbols(BUILD / "libsn_trt_plugin_preload.so", "--undefined-only")
    assert "getPluginRegistry" not in _symbols(PLUGIN, "--undefined-only")


@needs_plugin
def test_host_checks_and_serialization_round_trip():
    proc = subprocess.run([str(HOST_TEST)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all plugin host checks passed" in proc.stdout


def _header_sets() -> dict[int, Path]:
    """TensorRT include folders on this machine, the first found per major version."""
    cands = [Path(os.environ[v]) for v in ("TENSORRT_INCLUDE_DIR", "TENSORRT11_INCLUDE_DIR")
             if os.environ.get(v)]
    cands += [ROOT / "third_party" / "tensorrt" / "include",  # NVIDIA/TensorRT include/ (11)
              ROOT / "build" / "tensorrt-headers" / "include"]  # scripts/trt_headers.py (10.14)
    spec = importlib.util.find_spec("kernel_lens")  # the wheel those 10.14 headers come from
    if spec is not None and spec.submodule_search_locations:
        cands += [Path(p) / "include" / "tensorrt" for p in spec.submodule_search_locations]
    found: dict[int, Path] = {}
    for inc in cands:
        version = inc / "NvInferVersion.h"
        if (inc / "NvInferRuntime.h").is_file() and version.is_file():
            m = re.search(r"#define\s+(?:TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MAJOR)\s+(\d+)",
                          version.read_text(errors="replace"))
            if m:
                found.setdefault(int(m.group(1)), inc)
    return found


_HEADERS = _header_sets()
_HOW = {10: "run `python scripts/trt_headers.py build/tensorrt-headers` (kernel-lens wheel) or set "
            "TENSORRT_INCLUDE_DIR",
        11: "extract NVIDIA/TensorRT's include/ into third_party/tensorrt or set "
            "TENSORRT11_INCLUDE_DIR"}


@pytest.mark.parametrize("major", [
    pytest.param(m, id=f"trt{m}", marks=pytest.mark.skipif(
        m not in _HEADERS or shutil.which("nvcc") is None or shutil.which("cmake") is None,
        reason=f"TensorRT {m} headers or nvcc/cmake not present: {_HOW[m]}"))
    for m in (10, 11)])
def test_builds_against_tensorrt_headers(tmp_path, major):
    """A fresh build (one CUDA arch, for speed) against each major's headers, then its checks."""
    build = tmp_path / "b"
    subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(build),
                    f"-DTENSORRT_INCLUDE_DIR={_HEADERS[major]}", "-DCMAKE_CUDA_ARCHITECTURES=80-real",
                    "-DONNXRUNTIME_INCLUDE_DIR=/nonexistent"], check=True, capture_output=True)
    proc = subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "sn_trt_plugin",
                           "sn_trt_plugin_host_test"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _assert_loadable_without_libnvinfer(build / "libsn_trt_plugin.so")
    run = subprocess.run([str(build / "sn_trt_plugin_host_test")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------ (b) engines, where TensorRT runs
def _tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the bindings' own load errors
        return f"tensorrt is not importable ({type(exc).__name__})"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


_NO_TRT = _tensorrt_and_gpu()


def _plugin_onnx(tmp_path, shape, fp16=False, **kw):
    from sn_deploy.passes.fp16 import to_fp16

    model, p = sn_model(shape, **kw)
    model = to_plugin_model(model)
    return save_model_atomic(to_fp16(model) if fp16 else model, tmp_path / "m.trt.onnx"), p


@pytest.mark.tensorrt
@pytest.mark.skipif(_NO_TRT is not None, reason=str(_NO_TRT))
@needs_plugin
@pytest.mark.parametrize("shape,using_bn", [((2, 5, 7, 7), True), ((2, 5, 7, 7), False),
                                            ((4, 9), True), ((2, 3, 4, 5, 6), True)],
                         ids=["2d", "2d-no-bn", "rank2", "3d"])
def test_plugin_engine_matches_reference(tmp_path, shape, using_bn):
    """One plugin node over a dynamic-batch profile: min, opt and max batch against the reference."""
    from sn_deploy.runtime.tensorrt import EngineRunner, build_engine

    onnx_path, p = _plugin_onnx(tmp_path, shape, using_bn=using_bn, dynamic=(0,))
    N, rest = shape[0], tuple(shape[1:])
    cache = tmp_path / "timing.cache"
    plan = build_engine(onnx_path, PLUGIN, tmp_path / "m.plan", (1, *rest), shape, (2 * N, *rest),
                        timing_cache=str(cache))
    assert cache.is_file() and cache.stat().st_size > 0
    runner = EngineRunner(plan, PLUGIN)
    rng = np.random.default_rng(0)
    for n in (1, N, 2 * N):
        x = rng.normal(1.0, 2.0, size=(n, *rest)).astype(np.float32)
        y = runner.run({"X": x})["l.output"]
        np.testing.assert_allclose(y, ref(x.astype(np.float64), p), rtol=1e-4, atol=1e-4)


@pytest.mark.tensorrt
@pytest.mark.skipif(_NO_TRT is not None, reason=str(_NO_TRT))
@needs_plugin
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_plugin_engine_with_residual(tmp_path, fp16):
    """The two-input form (X, residual): relu(SN(x) + r) against the reference."""
    from sn_deploy.runtime.tensorrt import EngineRunner, build_engine

    onnx_path, p = _plugin_onnx(tmp_path, (2, 8, 16, 16), fp16=fp16, relu=True, residual=True)
    runner = EngineRunner(build_engine(onnx_path, PLUGIN, tmp_path / "m.plan", tf32=False), PLUGIN)
    dtype = np.float16 if fp16 else np.float32
    rng = np.random.default_rng(0)
    x, r = (rng.normal(size=(2, 8, 16, 16)).astype(dtype) for _ in range(2))
    y = runner.run({"X": x, "R": r})["l.output"]
    expected = ref(x.astype(np.float64), p, relu=True, residual=r.astype(np.float64))
    tol = dict(rtol=1e-2, atol=2e-2) if fp16 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.astype(np.float64), expected, **tol)


@pytest.mark.tensorrt
@pytest.mark.skipif(_NO_TRT is not None, reason=str(_NO_TRT))
@needs_plugin
def test_fp16_engine_keeps_fp16_io(tmp_path):
    from sn_deploy.runtime.tensorrt import EngineRunner, build_engine

    onnx_path, p = _plugin_onnx(tmp_path, (2, 8, 16, 16), fp16=True, relu=True)
    plan = build_engine(onnx_path, PLUGIN, tmp_path / "m.plan")
    runner = EngineRunner(plan, PLUGIN)
    assert runner._dtypes["X"] == np.float16
    x = np.random.default_rng(0).normal(size=(2, 8, 16, 16)).astype(np.float16)
    y = runner.run({"X": x})["l.output"]
    np.testing.assert_allclose(y, ref(x.astype(np.float64), p, relu=True), rtol=1e-2, atol=2e-2)


@pytest.mark.tensorrt
@pytest.mark.skipif(_NO_TRT is not None, reason=str(_NO_TRT))
@needs_plugin
def test_degenerate_planes_fail_build_or_enqueue(tmp_path):
    """Spatial size 1 everywhere: the build is refused; inside a wider profile: enqueue fails."""
    from sn_deploy.errors import SnDeployError
    from sn_deploy.runtime.tensorrt import EngineRunner, build_engine

    onnx_path, _ = _plugin_onnx(tmp_path, (2, 4, 1, 1))
    with pytest.raises(SnDeployError):
        build_engine(onnx_path, PLUGIN, tmp_path / "bad.plan")
    assert not (tmp_path / "bad.plan").exists()
    onnx_path, p = _plugin_onnx(tmp_path, (2, 4, 3, 3), dynamic=(2, 3))
    plan = build_engine(onnx_path, PLUGIN, tmp_path / "m.plan", (2, 4, 1, 1), (2, 4, 3, 3),
                        (2, 4, 3, 3))
    runner = EngineRunner(plan, PLUGIN)
    x = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(runner.run({"X": x})["l.output"], ref(x.astype(np.float64), p),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(SnDeployError, match="execution failed"):
        runner.run({"X": np.ones((2, 4, 1, 1), np.float32)})


@pytest.mark.tensorrt
@pytest.mark.skipif(_NO_TRT is not None, reason=str(_NO_TRT))
@needs_plugin
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-residual"])
def test_resnet_engine_parity(tmp_path, fused):
    import torch

    from sn_deploy.export import export_sn_onnx
    from sn_deploy.models import build_model
    from sn_deploy.passes.fuse import fuse_model
    from sn_deploy.runtime.tensorrt import EngineRunner, build_engine
    from tests.conftest import randomize_sn

    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    sn = export_sn_onnx(model, (2, 3, 64, 64))
    onnx_path = save_model_atomic(to_plugin_model(fuse_model(sn) if fused else sn),
                                  tmp_path / "m.trt.onnx")
    plan = build_engine(onnx_path, PLUGIN, tmp_path / "m.plan", tf32=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = EngineRunner(plan, PLUGIN).run({"input": x})["output"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ (c) what runs without TensorRT
@pytest.mark.skipif(_NO_TRT is None, reason="TensorRT and a GPU are present")
def test_runtime_says_what_is_missing():
    from sn_deploy.runtime.tensorrt import TensorRTUnavailable, build_engine

    with pytest.raises(TensorRTUnavailable, match="TensorRT|GPU"):
        build_engine("m.onnx", "lib.so", "m.plan")


@pytest.mark.skipif(_NO_TRT is None, reason="TensorRT and a GPU are present")
def test_cli_missing_tensorrt_writes_nothing(tmp_path, capsys, monkeypatch):
    from sn_deploy.cli import build_engine as cli
    from tests.test_cli import assert_one_line_error, run_cli

    onnx_path, _ = _plugin_onnx(tmp_path, (2, 4, 6, 6))
    lib = tmp_path / "libsn_trt_plugin.so"
    lib.write_bytes(b"\x7fELF")
    before = sorted(tmp_path.iterdir())
    code, out, err = run_cli(cli.main, [onnx_path, "--plugin-lib", lib, "--fp16",
                                        "-o", tmp_path / "m.plan"], capsys, monkeypatch)
    assert_one_line_error(code, err, "TensorRT")
    assert "install" in err and "trtexec --onnx=" in out
    assert sorted(tmp_path.iterdir()) == before


def test_cli_print_trtexec_only_fp16_writes_the_model_it_names(tmp_path, capsys, monkeypatch):
    import onnx
    from onnx import TensorProto

    from sn_deploy.cli import build_engine as cli
    from tests.test_cli import run_cli

    onnx_path, _ = _plugin_onnx(tmp_path, (2, 4, 6, 6), dynamic=(0,))
    lib = tmp_path / "libsn_trt_plugin.so"
    lib.write_bytes(b"\x7fELF")
    code, out, err = run_cli(cli.main, [onnx_path, "--plugin-lib", lib, "--fp16", "-o",
                                        tmp_path / "m.plan", "--min-shape", "1x4x6x6",
                                        "--opt-shape", "2x4x6x6", "--max-shape", "8x4x6x6",
                                        "--print-trtexec-only"], capsys, monkeypatch)
    assert code == 0, err
    half = tmp_path / "m.fp16.onnx"
    assert f"--onnx={half}" in out and "--stronglyTyped" in out and "--minShapes=X:1x4x6x6" in out
    assert onnx.load(half).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not (tmp_path / "m.plan").exists()
