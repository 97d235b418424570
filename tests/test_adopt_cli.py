"""A user's model built from the official SN classes, through the commands via ``--arch
module:factory``: calibrate (equal to the official batch average), export to every form (one
SwitchableNorm node per SN layer, named by the user's module paths), validate per layer; refusals
are one line with exit 2, and ``--no-adopt`` exports the model as plain ops."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from sn_deploy import onnx_ops
from sn_deploy.cli import calibrate as cli_calibrate
from sn_deploy.cli import export as cli_export
from sn_deploy.cli import validate as cli_validate
from tests import official_layout as off
from tests.test_cli import assert_one_line_error, run_cli

ARCH = "tests.official_layout:build_mixed"
SN_PATHS = ["norm0", "body.1", "body.4", "own", "head_norm"]  # 4 adopted + sn_deploy's own
CALIBRATED = [p for p in SN_PATHS if p != "body.4"]  # body.4 has no BN branch
ADOPTED = {"SwitchNorm2d": 2, "SyncSwitchableNorm2d": 1, "SwitchNorm1d": 1}
B, K = 8, 4


def build_broken(num_classes: int = 5):
    """``--arch`` factory whose SyncSN lost its running_var: refused at adoption."""
    model = off.MixedNet(num_classes)
    del model.body[1]._buffers["running_var"]
    return model


def build_mixed_cpu(num_classes: int = 5):
    """MixedNet without SyncSN, so that its official forward runs on a CPU (for --no-adopt)."""
    return off.MixedNet(num_classes, sync=False)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_model")
    model = off.build_mixed_trained()
    torch.save({"epoch": 90, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               d / "official.pth")
    data = np.random.default_rng(0).normal(0.3, 1.2, size=(40, 3, 16, 16)).astype(np.float32)
    np.save(d / "data.npy", data)
    return d


def official_batch_average(state: dict, data: np.ndarray) -> dict:
    """The official procedure, independently: SN layers (official classes) in training mode with
    ``using_moving_average=False`` accumulate Σ mean_bn and Σ(var_bn + mean_bn²) over K sequential
    batches from zero; then mean = Σ/K, var = Σ₂/K − mean² (pooled). Float64 throughout."""
    model = off.MixedNet(sync=False)  # the SyncSN layer's single-process twin
    model.own = off.SwitchNorm2d(16)  # sn_deploy's own layer too: nothing of sn_deploy runs here
    model.load_state_dict(state)
    model.double().eval()
    sn = [m for m in model.modules() if hasattr(m, "running_mean") and hasattr(m, "mean_weight")]
    for m in sn:
        m.using_moving_average = False
        m.running_mean.zero_()
        m.running_var.zero_()
        m.train()
    with torch.no_grad():
        for i in range(K):
            model(torch.from_numpy(data[i * B:(i + 1) * B]).double())
    out = {}
    for name, m in model.named_modules():
        if m in sn:
            mean = m.running_mean / K
            out[name] = (mean, m.running_var / K - mean ** 2)
    return out


def test_calibrate_equals_the_official_batch_average(user, capsys, monkeypatch):
    code, stdout, err = run_cli(cli_calibrate.main, [
        user / "official.pth", "--arch", ARCH, "--data", user / "data.npy", "--batch-size", B,
        "--num-batches", K, "--order", "sequential", "--output", user / "calibrated.pth",
        "--report", user / "cal.json", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert "adopted 4 SN layers as sn_deploy layers (2 SwitchNorm2d, 1 SyncSwitchableNorm2d, " \
           "1 SwitchNorm1d); 1 sn_deploy SN layer as they are" in stdout
    saved = torch.load(user / "calibrated.pth", weights_only=True)
    assert set(saved) == {"epoch", "state_dict"}
    state = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
    original = torch.load(user / "official.pth", weights_only=True)["state_dict"]
    assert set(state) == {k.removeprefix("module.") for k in original}  # keys unchanged
    data = np.load(user / "data.npy")
    start = {k.removeprefix("module."): v for k, v in original.items()}
    expected = official_batch_average(start, data)
    assert sorted(expected) == sorted(CALIBRATED)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(state[f"{name}.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[f"{name}.running_var"].double(), var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(state[f"{name}.running_var"], start[f"{name}.running_var"])
    report = json.loads((user / "cal.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == CALIBRATED
    assert report["adoption"]["counts"] == ADOPTED


def test_export_every_target_and_validate_per_layer(user, capsys, monkeypatch):
    ckpt = user / "official.pth"
    out, repo = user / "export", user / "repo"
    code, stdout, err = run_cli(cli_export.main, [
        ckpt, "--arch", ARCH, "--input-shape", "2x3x16x16", "--dynamic-batch", "--target",
        "tensorrt", "--triton-repo", repo, "--model-name", "mixed", "-o", out],
        capsys, monkeypatch)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("adopted 4 SN layers as sn_deploy layers")
    assert "PASSED" in stdout and "first divergent layer: none" in stdout, stdout
    sn = onnx.load(out / "model.sn.onnx")
    nodes = [n for n in sn.graph.node if n.op_type == onnx_ops.OP_TYPE]
    assert sorted(n.name for n in nodes) == sorted(SN_PATHS)
    eps = {n.name: next(a.f for a in n.attribute if a.name == onnx_ops.ATTR_EPSILON) for n in nodes}
    assert eps["norm0"] == pytest.approx(2e-5, rel=1e-6) and eps["body.1"] == pytest.approx(1e-5)
    trt = onnx.load(out / "model.trt.onnx")
    assert [n.op_type for n in trt.graph.node].count("SwitchableNorm_TRT") == len(SN_PATHS)
    assert not any(n.op_type == onnx_ops.OP_TYPE for n in onnx.load(out / "model.onnx").graph.node)
    assert (repo / "mixed" / "config.pbtxt").is_file() and (repo / "mixed" / "1" / "model.onnx").is_file()
    assert (repo / "mixed_trt" / "config.pbtxt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["adoption"]["counts"] == ADOPTED
    assert [a["path"] for a in report["adoption"]["layers"]] == ["norm0", "body.1", "body.4",
                                                                 "head_norm"]
    for form in report["forms"]:
        names = [c["name"] for c in form["layers"]]
        assert set(SN_PATHS) <= set(names) and {"gn", "bn"} <= set(names), names
        assert all(c["passed"] for c in form["layers"]) and not form["missing_layers"]

    code, stdout, err = run_cli(cli_validate.main, [
        ckpt, "--arch", ARCH, "--onnx", out / "model.sn.onnx", "--onnx", out / "model.onnx",
        "--per-layer", "--batch", "3", "--seed", "4", "--json", user / "val.json"],
        capsys, monkeypatch)
    assert code == 0, err
    assert "first divergent layer: none" in stdout
    val = json.loads((user / "val.json").read_text())
    assert val["adoption"]["adopted"] == 4
    worst = max(c["max_abs"] for f in val["forms"] for c in f["layers"] + f["outputs"])
    assert worst < 1e-4, worst  # the same parity as sn_deploy's own ResNets


def test_refused_look_alike_is_one_line_exit_2_in_every_command(user, capsys, monkeypatch,
                                                                 tmp_path):
    arch = "tests.test_adopt_cli:build_broken"
    model = build_broken()
    torch.save(model.state_dict(), tmp_path / "broken.pth")
    want = "SN-like module 'body.1' (SyncSwitchableNorm2d) cannot be adopted: it has a BN " \
           "branch but no buffer running_var"
    for main, extra in [
        (cli_calibrate.main, ["--data", user / "data.npy", "--output", tmp_path / "c.pth",
                              "--batch-size", "4", "--num-batches", "2", "--quiet"]),
        (cli_export.main, ["--input-shape", "1x3x16x16", "-o", tmp_path / "out"]),
        (cli_validate.main, ["--onnx", user / "export" / "model.onnx"]),
    ]:
        code, _, err = run_cli(main, [tmp_path / "broken.pth", "--arch", arch, *extra],
                               capsys, monkeypatch)
        assert_one_line_error(code, err, want)
    # nothing is left behind: the output folder the failed export created is removed too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


def test_no_adopt_exports_plain_ops(user, capsys, monkeypatch, tmp_path):
    model = off.build_mixed_trained()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    arch = "tests.test_adopt_cli:build_mixed_cpu"
    code, stdout, err = run_cli(cli_export.main, [
        tmp_path / "m.pth", "--arch", arch, "--input-shape", "2x3x16x16", "--no-adopt",
        "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0, err
    assert "adopted" not in stdout and "PASSED" in stdout
    nodes = [n for n in onnx.load(tmp_path / "out" / "model.sn.onnx").graph.node
             if n.op_type == onnx_ops.OP_TYPE]
    assert [n.name for n in nodes] == ["own"]  # only sn_deploy's own layer is an SN node
    assert "adoption" not in json.loads((tmp_path / "out" / "report.json").read_text())
