"""GroupNorm (and BN/IN/LN) models through the same pipeline as SN: export, parity per output and
per normalization layer, at the default opset and at 17."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from sn_deploy.nn import SwitchNorm2d
from sn_deploy.pipeline import run_export


class GnSnNet(nn.Module):
    """A small detector-style backbone mixing GroupNorm, SN, BatchNorm and LayerNorm."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.sn2 = SwitchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.gn3 = nn.GroupNorm(8, 32)
        self.bn4 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)
        self.ln = nn.LayerNorm(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn1(self.conv1(x)))
        x = torch.relu(self.sn2(self.conv2(x)))
        x = torch.relu(self.bn4(self.gn3(self.conv3(x))))
        return self.ln(self.head(x.mean((2, 3))))


def gn_sn_net(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = GnSnNet(num_classes)
    with torch.no_grad():  # non-trivial affine and running stats, so every term matters
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, SwitchNorm2d)):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
            if isinstance(m, (nn.BatchNorm2d, SwitchNorm2d)):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def gn_only_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.GroupNorm(4, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.mark.parametrize("opset", [18, 17])
def test_group_norm_model_exports_with_parity_per_layer(opset, tmp_path):
    ckpt = tmp_path / "gn.pth"
    torch.save({"epoch": 1, "best_prec1": 0.0, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in gn_sn_net().state_dict().items()}},
               ckpt)
    job = run_export(str(ckpt), "tests.test_group_norm:gn_sn_net", (2, 3, 32, 32),
                     tmp_path / "out", opset=opset, log=lambda m: None)
    assert job.validation.passed
    for form in job.validation.forms:
        # the LayerNorm's output is the graph output itself, compared as such
        assert [c.name for c in form.layers] == ["gn1", "sn2", "gn3", "bn4"]
        assert form.missing_layers == []
        assert all(c.max_abs < 1e-4 for c in form.layers)
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node)
    assert ops["InstanceNormalization"] == 2 and "SwitchableNorm" not in ops
    assert onnx.load(tmp_path / "out" / "model.onnx").opset_import[0].version == opset


def test_plain_group_norm_model_is_exported_and_validated(tmp_path):
    torch.save(gn_only_net().state_dict(), tmp_path / "gn.pth")
    notes = []
    job = run_export(str(tmp_path / "gn.pth"), "tests.test_group_norm:gn_only_net",
                     (1, 3, 16, 16), tmp_path / "out", log=notes.append)
    assert job.validation.passed and any("no SwitchNorm layer" in n for n in notes)
    out = job.validation.forms[0].outputs[0]
    assert out.shape == (1, 8) and out.max_abs < 1e-5
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    from sn_deploy.runtime.onnxruntime import create_session

    got = create_session(str(tmp_path / "out" / "model.onnx")).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, gn_only_net()(torch.from_numpy(x)).numpy(), atol=1e-5)
