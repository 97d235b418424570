"""The face-recognition IR-ResNets: the official layout (module names, shapes, eps 2e-5), and the
whole job on an ``ArcFaceWithLoss``-style checkpoint (``basemodel.*`` backbone, ``head.*``
classifier): calibrate → export → per-layer validate → TensorRT form → specialize, at 112x112."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sn_deploy.checkpoint import load_checkpoint, save_checkpoint_like
from sn_deploy.cli import calibrate as cli_calibrate
from sn_deploy.cli import export as cli_export
from sn_deploy.cli import specialize as cli_specialize
from sn_deploy.cli import validate as cli_validate
from sn_deploy.models import ARCHITECTURES, build_model
from sn_deploy.models.face_resnet import FaceResNet
from sn_deploy.nn import SwitchNorm2d, switch_norm_layers
from tests.conftest import randomize_sn
from tests.test_cli import run_cli

#: blocks per stage of the official face backbones (written from the paper's table, not read
#: from the module under test)
BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3],
          101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def test_all_depths_registered_with_and_without_se():
    for depth in BLOCKS:
        assert {f"face_resnet{depth}_sn", f"face_resnet{depth}_se_sn"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("depth", sorted(BLOCKS))
@pytest.mark.parametrize("use_se", [False, True])
def test_official_layout(depth, use_se):
    with torch.device("meta"):
        sd = FaceResNet(depth, use_se=use_se).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for stage, count in enumerate(BLOCKS[depth], start=1):
        blocks = {k.split(".")[1] for k in sd if k.startswith(f"layer{stage}.")}
        assert blocks == {str(i) for i in range(count)}, stage
    bottleneck = depth >= 101
    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["norm1.mean_weight"] == (3,) and shapes["norm1.running_var"] == (1, 64, 1)
    assert shapes["prelu.weight"] == (1,)
    if bottleneck:  # 1x1 reduce, 3x3, 1x1 expand to 4x; stage widths 256/512/1024/2048
        assert shapes["layer1.0.conv1.weight"] == (256, 64, 1, 1)
        assert shapes["layer1.0.conv3.weight"] == (1024, 256, 1, 1)
        assert shapes["layer1.0.norm4.weight"] == (1, 1024, 1, 1)
        assert shapes["layer4.0.downsample.0.weight"] == (8192, 4096, 1, 1)
        last = 8192
    else:
        assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3)
        assert "layer1.0.conv3.weight" not in shapes and "layer1.0.norm4.weight" not in shapes
        assert shapes["layer4.0.downsample.0.weight"] == (512, 256, 1, 1)
        last = 512
    assert shapes["layer2.0.conv2.weight"][2:] == (3, 3)
    assert shapes["layer2.0.downsample.1.running_mean"][0:2] == (1, shapes[
        "layer2.0.downsample.0.weight"][0])
    assert ("layer1.0.se.fc1.weight" in shapes) == use_se
    if use_se:
        width = 1024 if bottleneck else 64
        assert shapes["layer1.1.se.fc1.weight"] == (width // 16, width, 1, 1)
        assert shapes["layer1.1.se.pelu.weight"] == (1,)
        assert shapes["layer1.1.se.fc2.weight"] == (width, width // 16, 1, 1)
    assert shapes["output_layer.0.weight"] == (1, last, 1, 1)
    assert shapes["output_layer.3.weight"] == (512, last * 7 * 7)
    assert shapes["output_layer.4.running_mean"] == (512,)  # a plain BatchNorm1d
    assert "layer1.0.downsample.1.mean_weight" in shapes  # the shortcut's norm is SN too


def test_norms_are_sn_with_the_official_eps_and_momentum():
    for norm in ("sn", "syncsn"):
        model = build_model("face_resnet18_se_sn", norm=norm)
        layers = switch_norm_layers(model)
        assert len(layers) == 1 + 8 * 3 + 4 + 1
        for layer in (m for m in model.modules() if isinstance(m, SwitchNorm2d)):
            assert layer.eps == 2e-5 and layer.momentum == 0.9 and layer.using_bn
    with pytest.raises(ValueError, match="unknown face norm 'bn'"):
        build_model("face_resnet18_sn", norm="bn")


def test_forward_is_a_unit_embedding():
    model = randomize_sn(build_model("face_resnet18_se_sn")).eval()
    with torch.no_grad():
        y = model(torch.randn(3, 3, 112, 112))
    assert y.shape == (3, 512)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))


def _arcface_checkpoint(path, arch="face_resnet18_sn", num_identities=50, seed=0):
    """The official training wrapper's layout: backbone under basemodel., classifier under head."""
    torch.manual_seed(seed)
    backbone = randomize_sn(build_model(arch), seed=seed)
    sd = {"basemodel." + k: v for k, v in backbone.state_dict().items()}
    sd["head.weight"] = torch.randn(num_identities, 512)
    torch.save({"epoch": 20, "state_dict": sd}, path)
    return backbone


def test_wrapper_checkpoint_loads_strictly_into_the_backbone(tmp_path):
    backbone = _arcface_checkpoint(tmp_path / "face.pth")
    for arch in (None, "face_resnet18_sn"):
        loaded = load_checkpoint(tmp_path / "face.pth", arch)
        assert loaded.arch == "face_resnet18_sn"
        assert loaded.arch_source == ("inferred" if arch is None else "given")
        assert list(loaded.dropped) == ["head.weight"]
        for (k, a), b in zip(loaded.model.state_dict().items(), backbone.state_dict().values()):
            assert torch.equal(a, b), k
        assert loaded.notes()[-1] == ("dropped 1 key outside the backbone 'basemodel' (training "
                                      "only, not deployed): head.weight")
    save_checkpoint_like(loaded, loaded.model, tmp_path / "again.pth")
    raw = torch.load(tmp_path / "face.pth")["state_dict"]
    again = torch.load(tmp_path / "again.pth")
    assert again["epoch"] == 20 and list(again["state_dict"]) == list(raw)
    assert all(torch.equal(again["state_dict"][k], raw[k]) for k in raw)


def test_wrapper_with_another_depth_is_no_match(tmp_path, capsys, monkeypatch):
    _arcface_checkpoint(tmp_path / "face.pth")
    code, _, err = run_cli(cli_export.main, [tmp_path / "face.pth", "--arch", "face_resnet34_sn"],
                           capsys, monkeypatch)
    assert code == 2 and err.startswith("error: checkpoint does not match --arch face_resnet34_sn")


def _first_layer_batch_average(backbone, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The official batch average of the stem's SN layer, in float64 from the semantics: per batch
    mean_bn = mean_n mean_in, var_bn = mean_n(var_in + mean_in²) − mean_bn² (var_in unbiased);
    pooled over batches as running_mean = mean mean_bn, running_var = mean(var_bn + mean_bn²) − rm²."""
    w = backbone.conv1.weight.detach().double()
    means, squares = [], []
    for start in range(0, len(x), batch):
        h = torch.nn.functional.conv2d(torch.from_numpy(x[start:start + batch]).double(), w,
                                       padding=1).flatten(2).numpy()
        mean_in, var_in = h.mean(-1), h.var(-1, ddof=1)
        mean_bn = mean_in.mean(0)
        var_bn = (var_in + mean_in ** 2).mean(0) - mean_bn ** 2
        means.append(mean_bn)
        squares.append(var_bn + mean_bn ** 2)
    rm = np.mean(means, 0)
    return rm, np.mean(squares, 0) - rm ** 2


@pytest.mark.slow
def test_face_resnet18_whole_job(tmp_path, capsys, monkeypatch):
    backbone = _arcface_checkpoint(tmp_path / "face.pth")
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal((12, 3, 112, 112))).astype(np.float32)
    np.save(tmp_path / "faces.npy", x)

    # 1. calibrate, arch inferred; the output keeps the wrapper's layout and the head
    code, out, err = run_cli(cli_calibrate.main, [
        tmp_path / "face.pth", "--data", tmp_path / "faces.npy", "--batch-size", "4",
        "--num-batches", "3", "--order", "sequential", "--quiet", "-o", tmp_path / "cal.pth"],
        capsys, monkeypatch)
    assert code == 0, err
    assert "arch: face_resnet18_sn, inferred" in out and "dropped 1 key" in out
    cal = torch.load(tmp_path / "cal.pth")["state_dict"]
    raw = torch.load(tmp_path / "face.pth")["state_dict"]
    assert list(cal) == list(raw) and torch.equal(cal["head.weight"], raw["head.weight"])
    rm, rv = _first_layer_batch_average(backbone, x, 4)
    np.testing.assert_allclose(cal["basemodel.norm1.running_mean"].flatten().numpy(), rm,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cal["basemodel.norm1.running_var"].flatten().numpy(), rv,
                               rtol=1e-4, atol=1e-5)

    # 2. export with no other argument than the TensorRT target: 112x112, dynamic batch
    code, out, err = run_cli(cli_export.main, [tmp_path / "cal.pth", "--target", "tensorrt"],
                             capsys, monkeypatch)
    assert code == 0, err
    out_dir = tmp_path / "cal_export"
    assert "input: 1x3x112x112 (batch dynamic), the native size of face_resnet18_sn" in out
    sn = onnx.load(out_dir / "model.sn.onnx")
    nodes = [n for n in sn.graph.node if n.op_type == "SwitchableNorm"]
    assert len(nodes) == 30
    eps = {next(a.f for a in n.attribute if a.name == "epsilon") for n in nodes}
    assert eps == {float(np.float32(2e-5))}  # the layers' own eps, kept
    trt = onnx.load(out_dir / "model.trt.onnx")
    assert sum(n.op_type == "SwitchableNorm_TRT" for n in trt.graph.node) == 30
    assert not any(n.op_type == "SwitchableNorm" for n in trt.graph.node)

    # 3. per-layer parity at batch 3 (the dynamic batch), on the calibration images
    np.save(tmp_path / "val.npy", x[:3])
    code, out, err = run_cli(cli_validate.main, [
        tmp_path / "cal.pth", "--onnx", out_dir / "model.onnx", "--onnx", out_dir / "model.sn.onnx",
        "--inputs", tmp_path / "val.npy", "--per-layer", "--json", tmp_path / "parity.json"],
        capsys, monkeypatch)
    assert code == 0, out + err
    assert "31 SN layers, 0 beyond tolerance" in out  # the 30 SN + the embedding's BatchNorm1d
    parity = (tmp_path / "parity.json").read_text()
    assert all(name in parity for name in ("layer4.1.norm3", "output_layer.0", "output_layer.4"))

    # 4. specialize the exported model
    code, out, err = run_cli(cli_specialize.main, [out_dir / "model.sn.onnx", "-o",
                                                   tmp_path / "spec.sn.onnx"], capsys, monkeypatch)
    assert code == 0, err
    assert onnx.load(tmp_path / "spec.sn.onnx").graph.input[0].type.tensor_type.shape.dim[2] \
        .dim_value == 112
