"""SwitchNorm layers against the float64 reference, the official formulas and the official layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sn_deploy import reference as R
from sn_deploy.models import build_model
from sn_deploy.nn import DegenerateInputError, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from tests.conftest import randomize_sn


def _layer(cls, c, using_bn=True, seed=0):
    kw = {} if cls is SwitchNorm1d else {"using_bn": using_bn}
    m = torch.nn.Sequential(cls(c, **kw))
    randomize_sn(m, seed)
    return m[0].double()


def _ref(layer, x, training):
    return R.switchable_norm_from_state(layer.state_dict(), x, eps=layer.eps, training=training)


CASES = [
    (SwitchNorm2d, (3, 5, 7, 11), True),
    (SwitchNorm2d, (1, 4, 3, 3), True),
    (SwitchNorm2d, (2, 6, 5, 4), False),
    (SwitchNorm3d, (2, 3, 3, 4, 5), True),
    (SwitchNorm3d, (1, 2, 2, 2, 3), False),
    (SwitchNorm1d, (5, 7), True),
]


@pytest.mark.parametrize("cls,shape,using_bn", CASES)
@pytest.mark.parametrize("training", [False, True])
def test_matches_reference(cls, shape, using_bn, training, rng):
    if training and shape[0] == 1 and cls is SwitchNorm1d:
        pytest.skip("BN over one sample is undefined")
    layer = _layer(cls, shape[1], using_bn).train(training)
    layer.using_moving_average = True
    x = rng.normal(3.0, 2.0, size=shape)
    y = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, _ref(layer, x, training), rtol=1e-10, atol=1e-10)


def _official_formula(x, layer, training):
    """The official forward, transcribed in float64: E[x^2] - E[x]^2 forms, torch-free."""
    st_ = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    mean_in = xf.mean(-1, keepdims=True)
    var_in = xf.var(-1, ddof=1, keepdims=True)
    mean_ln = mean_in.mean(1, keepdims=True)
    temp = var_in + mean_in**2
    var_ln = temp.mean(1, keepdims=True) - mean_ln**2
    if training:
        mean_bn = mean_in.mean(0, keepdims=True)
        var_bn = temp.mean(0, keepdims=True) - mean_bn**2
    else:
        mean_bn, var_bn = st_["running_mean"], st_["running_var"]
    mw, vw = R.softmax(st_["mean_weight"]), R.softmax(st_["var_weight"])
    mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
    var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
    y = ((xf - mean) / np.sqrt(var + layer.eps)).reshape(x.shape)
    return y * st_["weight"] + st_["bias"]


@pytest.mark.parametrize("training", [False, True])
def test_equals_official_formula(training, rng):
    layer = _layer(SwitchNorm2d, 6).train(training)
    x = rng.normal(0.5, 1.5, size=(4, 6, 5, 5))
    y = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, _official_formula(x, layer, training), rtol=1e-9, atol=1e-9)


def test_stable_on_offset_inputs_float32(rng):
    """Mean 1000x the std: float32 forward stays close to the float64 reference."""
    layer = _layer(SwitchNorm2d, 8).float().eval()
    x = rng.normal(1000.0, 1.0, size=(2, 8, 16, 16))
    y = layer(torch.from_numpy(x).float()).detach().numpy()
    ref = _ref(layer.double(), x, False)
    assert np.abs(y - ref).max() < 5e-3


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 6), h=st.integers(1, 6), w=st.integers(2, 6),
    using_bn=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_eval_matches_reference(n, c, h, w, using_bn, seed):
    layer = _layer(SwitchNorm2d, c, using_bn, seed).eval()
    x = np.random.default_rng(seed).normal(size=(n, c, h, w))
    y = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, _ref(layer, x, False), rtol=1e-9, atol=1e-9)


def test_official_state_dict_layout():
    sd = SwitchNorm2d(8).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "weight": (1, 8, 1, 1), "bias": (1, 8, 1, 1), "mean_weight": (3,), "var_weight": (3,),
        "running_mean": (1, 8, 1), "running_var": (1, 8, 1),
    }
    assert {k: tuple(v.shape) for k, v in SwitchNorm2d(8, using_bn=False).state_dict().items()} == {
        "weight": (1, 8, 1, 1), "bias": (1, 8, 1, 1), "mean_weight": (2,), "var_weight": (2,),
    }
    assert tuple(SwitchNorm3d(4).state_dict()["weight"].shape) == (1, 4, 1, 1, 1)
    assert {k: tuple(v.shape) for k, v in SwitchNorm1d(5).state_dict().items()} == {
        "weight": (1, 5), "bias": (1, 5), "mean_weight": (2,), "var_weight": (2,),
        "running_mean": (1, 5), "running_var": (1, 5),
    }


def test_defaults():
    assert SwitchNorm2d(4).momentum == 0.9
    assert SwitchNorm3d(4).momentum == 0.997 and SwitchNorm1d(4).momentum == 0.997
    assert SwitchNorm2d(4).eps == 1e-5
    assert torch.all(SwitchNorm2d(4, last_gamma=True).weight == 0)
    assert torch.all(SwitchNorm2d(4).weight == 1)


def test_moving_average_convention(rng):
    layer = SwitchNorm2d(3, momentum=0.9).double().train()
    layer.running_mean.fill_(1.0)
    layer.running_var.fill_(2.0)
    x = rng.normal(size=(4, 3, 5, 5))
    layer(torch.from_numpy(x))
    mean_bn, var_bn = R.batch_stats(x)
    np.testing.assert_allclose(layer.running_mean.reshape(-1), 0.9 * 1.0 + 0.1 * mean_bn, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.reshape(-1), 0.9 * 2.0 + 0.1 * var_bn, rtol=1e-12)


def test_official_batch_average_accumulation(rng):
    """using_moving_average=False sums mean_bn and var_bn + mean_bn^2 (divided by the caller)."""
    layer = SwitchNorm2d(3, using_moving_average=False).double().train()
    xs = [rng.normal(i, 1 + i, size=(4, 3, 5, 5)) for i in range(3)]
    for x in xs:
        layer(torch.from_numpy(x))
    stats = [R.batch_stats(x) for x in xs]
    rm = layer.running_mean.reshape(-1).numpy() / 3
    rv = layer.running_var.reshape(-1).numpy() / 3 - rm**2
    ref_m, ref_v = R.batch_average(stats)
    np.testing.assert_allclose(rm, ref_m, rtol=1e-10)
    np.testing.assert_allclose(rv, ref_v, rtol=1e-8)


def test_degenerate_spatial_size_raises():
    with pytest.raises(DegenerateInputError, match="L-1 = 0"):
        SwitchNorm2d(4).eval()(torch.randn(2, 4, 1, 1))


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match="expects 4D"):
        SwitchNorm2d(4)(torch.randn(2, 4, 3))


def test_resnet_official_key_names():
    v1 = build_model("resnetv1sn50").state_dict()
    for key in ("sn1.mean_weight", "layer1.0.sn3.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.var_weight", "layer4.2.sn3.weight", "fc.bias"):
        assert key in v1
    assert len(v1) == 373
    v2 = build_model("resnetv2sn50").state_dict()
    for key in ("sn1.weight", "layer1.0.sn1.mean_weight", "layer1.0.downsample.weight",
                "sn_out.running_mean", "layer4.2.sn3.bias"):
        assert key in v2
    assert "layer1.0.downsample.1.weight" not in v2
    assert build_model("resnetv1sn18").state_dict()["layer1.0.sn2.weight"].abs().sum() == 0  # last_gamma
