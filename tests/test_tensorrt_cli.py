"""TensorRT-side commands where TensorRT is missing: clear errors; what runs anywhere, runs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from sn_deploy.cli import build_engine as cli_build
from sn_deploy.cli import export as cli_export
from sn_deploy.cli import validate as cli_validate
from sn_deploy.passes.fp16 import to_fp16
from sn_deploy.runtime.tensorrt import trtexec_command
from tests.test_cli import assert_one_line_error, run_cli, workdir  # noqa: F401
from tests.test_decompose import sn_model


def _tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


def test_export_target_tensorrt(workdir, capsys, monkeypatch):  # noqa: F811
    out = workdir / "trt"
    code, _, err = run_cli(cli_export.main, [workdir / "ckpt.pth", "--arch", "demo_sn_net",
                                             "--input-shape", "2x1x8x8", "--target", "tensorrt",
                                             "--output-dir", out], capsys, monkeypatch)
    assert code == 0, err
    model = onnx.load(out / "model.trt.onnx")
    assert [n.op_type for n in model.graph.node].count("SwitchableNorm_TRT") == 4


@pytest.mark.skipif(not _tensorrt_missing(), reason="TensorRT is present")
def test_build_engine_says_what_is_missing(workdir, capsys, monkeypatch, tmp_path):  # noqa: F811
    lib = tmp_path / "libsn_trt_plugin.so"
    lib.write_bytes(b"\x7fELF")
    code, out, err = run_cli(cli_build.main, [workdir / "trt" / "model.trt.onnx", "--plugin-lib", lib,
                                              "--fp16", "-o", tmp_path / "m.plan"], capsys, monkeypatch)
    assert_one_line_error(code, err, "TensorRT")
    assert "trtexec --onnx=" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libsn_trt_plugin.so"]


def test_print_trtexec_only(workdir, capsys, monkeypatch, tmp_path):  # noqa: F811
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"x")
    code, out, err = run_cli(cli_build.main, [
        workdir / "trt" / "model.trt.onnx", "--plugin-lib", lib, "-o", tmp_path / "m.plan",
        "--min-shape", "1x1x8x8", "--opt-shape", "4x1x8x8", "--max-shape", "16x1x8x8",
        "--timing-cache", tmp_path / "cache", "--print-trtexec-only"], capsys, monkeypatch)
    assert code == 0, err
    assert f"--dynamicPlugins={lib}" in out and "--minShapes=input:1x1x8x8" in out
    assert "--maxShapes=input:16x1x8x8" in out and "--timingCacheFile=" in out


def test_build_engine_bad_inputs(workdir, capsys, monkeypatch, tmp_path):  # noqa: F811
    code, _, err = run_cli(cli_build.main, [workdir / "trt" / "model.trt.onnx", "--plugin-lib",
                                            tmp_path / "none.so", "-o", tmp_path / "m.plan"],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, "plugin library")
    code, _, err = run_cli(cli_build.main, [tmp_path / "none.onnx", "--plugin-lib", tmp_path / "x.so",
                                            "-o", tmp_path / "m.plan"], capsys, monkeypatch)
    assert_one_line_error(code, err, "not found")


@pytest.mark.skipif(not _tensorrt_missing(), reason="TensorRT is present")
def test_validate_engine_without_tensorrt(workdir, capsys, monkeypatch, tmp_path):  # noqa: F811
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    code, _, err = run_cli(cli_validate.main, [workdir / "ckpt.pth", "--arch", "demo_sn_net",
                                               "--engine", plan, "--plugin-lib", plan,
                                               "--input-shape", "1x1x8x8"], capsys, monkeypatch)
    assert_one_line_error(code, err, "TensorRT")


def test_fp16_pass_keeps_plugin_fields_fp32():
    from sn_deploy.passes.to_plugin import to_plugin_model

    model, _ = sn_model((2, 4, 6, 6))
    half = to_fp16(to_plugin_model(model))
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    attrs = {a.name: a for a in half.graph.node[0].attribute}
    assert attrs["scale"].t.data_type == TensorProto.FLOAT


def test_fp16_pass_runs_in_onnxruntime():
    from sn_deploy.passes.decompose import decompose_model
    from sn_deploy.runtime.onnxruntime import create_session
    from tests.test_decompose import ref

    model, p = sn_model((2, 4, 6, 6))
    half = to_fp16(decompose_model(model))
    x = np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype(np.float16)
    y = create_session(half).run(None, {"X": x})[0]
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref(x.astype(np.float64), p), atol=3e-2)


def test_trtexec_command_static():
    cmd = trtexec_command("m.onnx", "lib.so", "m.plan")
    assert cmd == "trtexec --onnx=m.onnx --saveEngine=m.plan --dynamicPlugins=lib.so"
