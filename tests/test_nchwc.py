"""model.cpu.onnx: SN kept in onnxruntime's blocked NCHWc layout (kernel, pass, sessions, export)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sn_deploy import ops
from sn_deploy import reference as R
from sn_deploy.errors import InputError
from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.fuse import fuse_model
from sn_deploy.passes.nchwc import BLOCK_KEY, NCHWC_DOMAIN, OP_TYPE, nchwc_layers
from sn_deploy.runtime.onnxruntime import (create_session, native_op_library, nchwc_block_size,
                                           optimize_for_this_cpu)
from tests.conftest import randomize_sn

needs_kernel = pytest.mark.skipif(not ops.available(), reason="libsn_cpu.so cannot be built here")
needs_ort_nchwc = pytest.mark.skipif(
    native_op_library() is None or nchwc_block_size() == 0,
    reason="needs libsn_ort_op.so (make plugins) and an onnxruntime CPU with NCHWc kernels")


def _layer(C, using_bn, rng):
    nw = 3 if using_bn else 2
    return dict(scale=rng.normal(1, 0.2, C).astype(np.float32),
                bias=rng.normal(0, 0.2, C).astype(np.float32),
                running_mean=rng.normal(0, 1, C).astype(np.float32) if using_bn else None,
                running_var=rng.uniform(0.5, 2, C).astype(np.float32) if using_bn else None,
                mean_weights=R.softmax(rng.normal(size=nw)).astype(np.float32),
                var_weights=R.softmax(rng.normal(size=nw)).astype(np.float32))


@needs_kernel
@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("shape,using_bn", [((2, 5, 7, 11), True), ((1, 64, 28, 28), True),
                                             ((3, 20, 4, 4), False), ((2, 3, 3, 4, 5), True)])
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, False), (True, True)])
def test_blocked_kernel_matches_reference(block, shape, using_bn, relu, with_residual, rng):
    C = shape[1]
    p = _layer(C, using_bn, rng)
    x = (rng.normal(size=shape) * 2 + 0.5).astype(np.float32)
    r = rng.normal(size=shape).astype(np.float32) if with_residual else None
    xb = ops.to_nchwc(x, block)
    assert np.array_equal(ops.from_nchwc(xb, C, block), x)
    yb = ops.switchable_norm_cpu(xb, p["scale"], p["bias"], p["running_mean"], p["running_var"],
                                 p["mean_weights"], p["var_weights"], relu=relu,
                                 residual=None if r is None else ops.to_nchwc(r, block),
                                 nchwc_block=block, channels=C)
    expected = R.switchable_norm(x.astype(np.float64), p["scale"], p["bias"], p["mean_weights"],
                                 p["var_weights"], p["running_mean"], p["running_var"], relu=relu,
                                 residual=r)
    np.testing.assert_allclose(ops.from_nchwc(yb, C, block), expected, rtol=1e-5, atol=1e-5)
    padding = ops.from_nchwc(yb, yb.shape[1], block)[:, C:]
    assert not padding.size or not padding.any()  # padding channels come out 0
    # the same numbers as the plain NCHW kernel
    y = ops.switchable_norm_cpu(x, p["scale"], p["bias"], p["running_mean"], p["running_var"],
                                p["mean_weights"], p["var_weights"], relu=relu, residual=r)
    np.testing.assert_allclose(ops.from_nchwc(yb, C, block), y, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_blocked_kernel_on_offset_inputs(rng):
    p = _layer(24, True, rng)
    x = (1000 + rng.normal(size=(2, 24, 16, 16))).astype(np.float32)
    yb = ops.switchable_norm_cpu(ops.to_nchwc(x, 16), p["scale"], p["bias"], p["running_mean"],
                                 p["running_var"], p["mean_weights"], p["var_weights"],
                                 nchwc_block=16, channels=24)
    expected = R.switchable_norm(x.astype(np.float64), p["scale"], p["bias"], p["mean_weights"],
                                 p["var_weights"], p["running_mean"], p["running_var"])
    np.testing.assert_allclose(ops.from_nchwc(yb, 24, 16), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


@needs_kernel
def test_blocked_kernel_refuses_bad_layouts(rng):
    p = _layer(20, True, rng)
    x = ops.to_nchwc(rng.normal(size=(1, 20, 4, 4)).astype(np.float32), 8)
    args = (p["scale"], p["bias"], p["running_mean"], p["running_var"], p["mean_weights"],
            p["var_weights"])
    with pytest.raises(ValueError, match="NCHWc tensor of 20 channels"):
        ops.switchable_norm_cpu(x, *args, nchwc_block=16, channels=20)
    with pytest.raises(ValueError, match="invalid argument"):  # the kernel knows blocks 4, 8, 16
        ops.switchable_norm_cpu(ops.to_nchwc(np.zeros((1, 20, 4, 4), np.float32), 12), *args,
                                nchwc_block=12, channels=20)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    return model, fuse_model(export_sn_onnx(model, (2, 3, 64, 64), dynamic_batch=True))


@needs_ort_nchwc
def test_every_sn_layer_stays_in_nchwc(resnet18):
    model, sn = resnet18
    cpu = optimize_for_this_cpu(sn)
    ops_ = [(n.domain, n.op_type) for n in cpu.graph.node]
    assert nchwc_layers(cpu) == 20 and ("sn_deploy", "SwitchableNorm") not in ops_
    # the only reorder left feeds the global pooling
    assert ops_.count((NCHWC_DOMAIN, "ReorderOutput")) == 1
    assert ops_.count((NCHWC_DOMAIN, "ReorderInput")) <= 1  # the stem input (3 channels: none)
    meta = {p.key: p.value for p in cpu.metadata_props}
    assert meta[BLOCK_KEY] == str(nchwc_block_size())
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = create_session(cpu, threads=2).run(None, {"input": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@needs_ort_nchwc
def test_model_for_another_block_size_is_refused(resnet18, tmp_path):
    cpu = optimize_for_this_cpu(resnet18[1])
    other = 8 if nchwc_block_size() == 16 else 16
    for p in cpu.metadata_props:
        if p.key == BLOCK_KEY:
            p.value = str(other)
    onnx.save(cpu, tmp_path / "model.cpu.onnx")
    with pytest.raises(InputError, match=f"NCHWc block {other}; this CPU uses"):
        create_session(tmp_path / "model.cpu.onnx")


@needs_ort_nchwc
def test_sn_export_cpu_optimize(tmp_path, capsys, monkeypatch):
    from sn_deploy.cli import export as cli_export
    from tests.test_cli import run_cli

    torch.manual_seed(0)
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    torch.save({"epoch": 1, "best_prec1": 0.0, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "r18.pth")
    code, out, err = run_cli(cli_export.main, [tmp_path / "r18.pth", "--arch", "resnetv1sn18",
                                               "--input-shape", "1x3x64x64", "-o", tmp_path / "out",
                                               "--cpu-optimize"], capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "out" / "model.cpu.onnx").is_file() and "model.cpu.onnx" in out
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    forms = {f["name"]: f for f in report["forms"]}
    assert set(forms) == {"model.onnx", "model.sn.onnx", "model.cpu.onnx"}
    assert all(f["passed"] for f in forms.values())
    assert not forms["model.cpu.onnx"]["missing_layers"]
