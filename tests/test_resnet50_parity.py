"""Issue-level parity: the official-layout ResNet-50 v1 through sn-export (every optimization on:
ReLU and residual fusion) passes at atol = rtol = 1e-4 on ordinary inputs and on inputs whose mean
is 1000x their standard deviation, in both ONNX forms, per output and per layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sn_deploy.models import build_model
from sn_deploy.pipeline import run_export
from tests.conftest import randomize_sn


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("r50")
    torch.manual_seed(0)
    model = randomize_sn(build_model("resnetv1sn50", num_classes=100))
    torch.save({"epoch": 90, "best_prec1": 77.5, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               d / "r50.pth")
    return d


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_resnet50_parity(checkpoint, offset, tmp_path):
    x = (offset + np.random.default_rng(3).standard_normal((2, 3, 64, 64))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    job = run_export(str(checkpoint / "r50.pth"), "resnetv1sn50", (2, 3, 64, 64),
                     tmp_path / "out", validate_inputs=str(tmp_path / "x.npy"),
                     atol=1e-4, rtol=1e-4, log=lambda m: None)
    assert [f.name for f in job.validation.forms] == ["model.onnx", "model.sn.onnx"]
    for form in job.validation.forms:
        assert form.passed, (form.name, form.first_divergent_layer)
        assert len(form.layers) == 53 and not form.missing_layers
        assert form.first_divergent_layer is None
