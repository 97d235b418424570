"""Sparse Switchable Normalization: sparsestmax, the official SSN2d layout, and SSN end to end
(official-format checkpoint → calibration → export → parity → exact specialization)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sn_deploy import reference as R
from sn_deploy.calibrate import calibrate_from_data
from sn_deploy.checkpoint import load_checkpoint
from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.nn import SparseSwitchNorm2d, sparsemax, sparsestmax, switch_norm_layers
from sn_deploy.passes.specialize import measure_specialization, specialize_model
from sn_deploy.pipeline import run_export
from tests.conftest import randomize_sn

BRANCHES = ("in", "ln", "bn")


def test_sparsestmax_values_worked_by_hand():
    v = torch.tensor([0.5, 0.3, 0.2])
    # already on the simplex, 0.216 from the centre: radius 0.2 leaves it, 0.5 pushes it out
    assert torch.allclose(sparsestmax(v, 0.2), v)
    d = torch.tensor([1 / 6, -1 / 30, -2 / 15])
    expected = 0.5 * d / d.norm() + 1 / 3
    assert torch.allclose(sparsestmax(v, 0.5), expected, atol=1e-6)
    # far enough out, it leaves the simplex and is projected back to a vertex
    assert torch.equal(sparsestmax(v, 1.0), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(sparsestmax(torch.tensor([0.4, 0.35, 0.3]), 0.9), torch.tensor([1.0, 0, 0]))
    # equal logits: no direction to push in; the official code returns NaN here
    assert torch.allclose(sparsestmax(torch.ones(3), 0.5), torch.full((3,), 1 / 3))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=3), st.floats(0.0, 1.5))
def test_sparsestmax_stays_on_the_simplex_and_outside_the_ball(values, radius):
    v = torch.tensor(values, dtype=torch.float64)
    w = sparsestmax(v, radius)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert abs(float(w.sum()) - 1.0) < 1e-9
    s = sparsemax(v)
    assert abs(float(s.sum()) - 1.0) < 1e-9 and (s >= 0).all()
    if float((w > 0).sum()) == v.numel():  # interior of the simplex: at least radius from centre
        u = torch.full_like(w, 1 / v.numel())
        dist_sparsemax = float((s - u).norm())
        if dist_sparsemax > 1e-6:
            assert float((w - u).norm()) >= min(radius, dist_sparsemax) - 1e-9


def test_layer_has_the_official_state_layout():
    layer = SparseSwitchNorm2d(8)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()}
    assert shapes == {
        "weight": ((1, 8, 1, 1), torch.float32), "bias": ((1, 8, 1, 1), torch.float32),
        "mean_weight": ((3,), torch.float32), "var_weight": ((3,), torch.float32),
        "running_mean": ((1, 8, 1), torch.float32), "running_var": ((1, 8, 1), torch.float32),
        "mean_fixed": ((1,), torch.int64), "var_fixed": ((1,), torch.int64),
        "radius": ((1,), torch.float32),
    }
    assert layer.momentum == 0.997
    model = build_model("resnetv1ssn50")
    names = {n for n, _ in switch_norm_layers(model)}
    assert {"sn1", "layer1.0.sn3", "layer1.0.downsample.1", "layer4.2.sn3"} <= names
    assert model.maxpool.ceil_mode and model.maxpool.padding == 0
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_fixed_weights_are_used_as_stored_and_free_ones_through_sparsestmax(rng):
    layer = SparseSwitchNorm2d(6).eval()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
        layer.mean_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
        layer.mean_fixed.fill_(1)
        layer.var_weight.copy_(torch.tensor([0.5, 0.3, 0.2]))
        layer.radius.fill_(0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mw, vw = layer.mixing_weights()
    assert torch.equal(mw, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(vw, sparsestmax(torch.tensor([0.5, 0.3, 0.2]), 0.5))
    x = rng.normal(size=(2, 6, 5, 5)).astype(np.float32)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    ref = R.switchable_norm(x, layer.weight.detach().numpy(), layer.bias.detach().numpy(),
                            mw.detach().numpy(), vw.detach().numpy(), layer.running_mean.numpy(),
                            layer.running_var.numpy())
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    for k, v in layer.state_dict().items():  # deployment never changes the stored state
        assert torch.equal(v, before[k]), k


def _trained_ssn(seed: int = 0) -> torch.nn.Module:
    """An SSN ResNet-18 as training leaves it: most layers fixed one-hot, a few still free."""
    model = randomize_sn(build_model("resnetv1ssn18", num_classes=10), seed)
    g = np.random.default_rng(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(switch_norm_layers(model)):
            if i % 5 == 4:  # still free: sparsestmax at the stored radius
                layer.radius.fill_(0.3)
                continue
            k = int(g.integers(3))
            layer.mean_weight.copy_(torch.eye(3)[k])
            layer.var_weight.copy_(torch.eye(3)[k])
            layer.mean_fixed.fill_(1)
            layer.var_fixed.fill_(1)
    return model


@pytest.fixture(scope="module")
def ssn_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssn")
    model = _trained_ssn()
    torch.save({"epoch": 100, "best_prec1": 75.8, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               d / "ssn.pth")
    np.save(d / "calib.npy", np.random.default_rng(1).normal(size=(16, 3, 64, 64)).astype(np.float32))
    return d, model


def test_official_ssn_checkpoint_calibrates_and_exports_with_parity(ssn_job):
    d, model = ssn_job
    loaded = load_checkpoint(d / "ssn.pth", "resnetv1ssn18")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    result = calibrate_from_data(loaded.model, str(d / "calib.npy"), batch_size=4, num_batches=4,
                                 order="sequential", progress=False)
    assert len(result.layers) == len(switch_norm_layers(model))
    fixed = [lc for lc in result.layers if max(lc.mean_weights.values()) == 1.0]
    assert fixed and all(sorted(lc.mean_weights.values()) == [0.0, 0.0, 1.0] for lc in fixed)
    for (_, a), (_, b) in zip(switch_norm_layers(loaded.model), switch_norm_layers(model)):
        assert torch.equal(a.mean_weight, b.mean_weight) and torch.equal(a.radius, b.radius)
    job = run_export(str(d / "ssn.pth"), "resnetv1ssn18", (2, 3, 64, 64), d / "out", log=lambda m: None)
    assert job.validation.passed
    assert all(len(f.layers) == len(switch_norm_layers(model)) for f in job.validation.forms)
    # the file sn-export wrote (ReLU and residual Adds fused) specializes exactly too
    import onnx

    sn = onnx.load(d / "out" / "model.sn.onnx")
    spec, done = specialize_model(sn)
    assert [s for s in done if not s.replaced_by.startswith("kept")]
    x = np.random.default_rng(4).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert measure_specialization(sn, spec, done, x) < 1e-4


def test_one_hot_ssn_layers_specialize_exactly(ssn_job):
    _, model = ssn_job
    sn = export_sn_onnx(model.eval(), (2, 3, 64, 64))
    spec, done = specialize_model(sn)
    layers = switch_norm_layers(model)
    fixed = {n for n, m in layers if bool(m.mean_fixed)}

    def one_hot(m) -> bool:
        mw, vw = (w.detach() for w in m.mixing_weights())
        return bool(mw.max() == 1.0) and torch.equal(mw, vw)

    # every fixed layer, plus any free one whose sparsestmax already is one-hot, and nothing else
    assert {s.layer for s in done} == {n for n, m in layers if one_hot(m)}
    assert fixed <= {s.layer for s in done}
    replaced = [s for s in done if not s.replaced_by.startswith("kept")]
    assert replaced, "expected some BN/IN layers among the one-hot ones"
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert measure_specialization(sn, spec, done, x) < 1e-4
    assert all(s.max_abs_error < 1e-4 for s in replaced)
