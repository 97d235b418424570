"""Batch-average calibration equals the pooled formula; nothing else in the model changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from sn_deploy import reference as R
from sn_deploy.calibrate import calibrate_batch_average
from sn_deploy.data import ArraySource, batches
from sn_deploy.errors import InputError
from sn_deploy.nn import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from tests.conftest import randomize_sn


class FirstSN(nn.Module):
    """SN first, so its inputs are the data itself; then layers that must stay untouched."""

    def __init__(self):
        super().__init__()
        self.sn = SwitchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.sn2 = SwitchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.sn1d = SwitchNorm1d(6)

    def forward(self, x):
        x = self.sn2(self.drop(self.bn(self.conv(self.sn(x)))))
        return self.sn1d(self.fc(x.mean((2, 3))))


def _model():
    torch.manual_seed(0)
    m = randomize_sn(FirstSN())
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
    return m


def _data(k=4, b=5, seed=0):
    rng = np.random.default_rng(seed)
    # batches with different means and spreads: pooled variance != mean of batch variances
    return [rng.normal(3 * i, 1 + i, size=(b, 3, 6, 6)).astype(np.float32) for i in range(k)]


def test_equals_pooled_formula():
    model, xs = _model(), _data()
    calibrate_batch_average(model, (torch.from_numpy(x) for x in xs), len(xs), progress=False)
    stats = [R.batch_stats(x) for x in xs]
    mean, var = R.batch_average(stats)
    np.testing.assert_allclose(model.sn.running_mean.reshape(-1), mean, rtol=1e-6)
    np.testing.assert_allclose(model.sn.running_var.reshape(-1), var, rtol=1e-6)
    naive = np.mean([v for _, v in stats], axis=0)
    assert np.all(np.abs(var - naive) > 0.5)  # the data makes the difference visible


def test_hand_computed_two_batches():
    """Two 1-channel batches whose statistics are easy to compute by hand."""
    layer = nn.Sequential(SwitchNorm2d(1))
    a = torch.tensor([0.0, 2.0, 0.0, 2.0]).reshape(2, 1, 1, 2)   # planes {0,2},{0,2}: mean 1, var 2
    b = torch.tensor([4.0, 6.0, 4.0, 6.0]).reshape(2, 1, 1, 2)   # mean 5, var 2
    calibrate_batch_average(layer, [a, b], 2, progress=False)
    assert layer[0].running_mean.item() == pytest.approx(3.0)       # (1 + 5) / 2
    assert layer[0].running_var.item() == pytest.approx(2.0 + 4.0)  # mean var + var of means


def test_nothing_else_changes():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_batch_average(model, (torch.from_numpy(x) for x in _data()), 4, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{l}.running_{s}" for l in ("sn", "sn2", "sn1d") for s in ("mean", "var")}
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.batch_stats_observer is None for m in (model.sn, model.sn2, model.sn1d))


def test_dropout_off_during_calibration():
    """With dropout active the result would depend on the RNG; it must not."""
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = _model()
        calibrate_batch_average(model, (torch.from_numpy(x) for x in _data()), 4, progress=False)
        results.append(model.sn2.running_var.clone())
    assert torch.equal(*results)


def test_precise_bn_batch_averages_bn():
    model = _model()
    calibrate_batch_average(model, (torch.from_numpy(x) for x in _data()), 4, precise_bn=True,
                            progress=False)
    # recompute BN inputs with the calibrated SN in training mode, as during calibration
    ref_model = _model()
    ref_model.sn.load_state_dict(model.sn.state_dict())
    stats = []
    for x in _data():
        ref_model.sn.train()
        with torch.no_grad():
            h = ref_model.conv(ref_model.sn(torch.from_numpy(x))).double()
        var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=True)
        stats.append((mean.numpy(), var.numpy()))
    mean, var = R.batch_average(stats)
    np.testing.assert_allclose(model.bn.running_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(model.bn.running_var, var, rtol=1e-5)


def test_report_contents():
    model = _model()
    res = calibrate_batch_average(model, (torch.from_numpy(x) for x in _data()), 4, progress=False)
    layer = res.to_json()["layers"][0]
    assert layer["name"] == "sn" and layer["batches"] == 4
    assert set(layer["mean_weights"]) == {"in", "ln", "bn"}
    assert sum(layer["mean_weights"].values()) == pytest.approx(1.0)
    assert res.num_samples == 20 and res.images_per_second > 0


def test_sequential_order_is_reproducible(tmp_path):
    arr = np.random.default_rng(0).normal(size=(40, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "d.npy", arr)
    src = ArraySource(str(tmp_path / "d.npy"))
    got = [b.numpy() for b in batches(src, 8, 3, order="sequential")]
    np.testing.assert_array_equal(np.concatenate(got), arr[:24])
    runs = []
    for _ in range(2):
        model = _model()
        calibrate_batch_average(model, batches(src, 8, 3, order="sequential"), 3, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_random_order_is_seeded(tmp_path):
    arr = np.arange(40 * 2, dtype=np.float32).reshape(40, 2, 1, 1)
    np.save(tmp_path / "d.npy", arr)
    src = ArraySource(str(tmp_path / "d.npy"))
    a = np.concatenate([b.numpy() for b in batches(src, 4, 5, order="random", seed=1)])
    b = np.concatenate([b.numpy() for b in batches(src, 4, 5, order="random", seed=1)])
    c = np.concatenate([b.numpy() for b in batches(src, 4, 5, order="random", seed=2)])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a[:, 0])) == 20  # without replacement


def test_too_few_batches_from_iterator():
    with pytest.raises(InputError, match="only 2 of 4 batches"):
        calibrate_batch_average(_model(), (torch.from_numpy(x) for x in _data(k=2)), 4,
                                progress=False)


@pytest.mark.parametrize("layer,shape", [(SwitchNorm1d(5), (6, 5)),
                                         (SwitchNorm3d(2), (4, 2, 3, 2, 2))])
def test_1d_and_3d_equal_the_reference(layer, shape):
    rng = np.random.default_rng(1)
    xs = [rng.normal(2 * i, 1 + i, size=shape).astype(np.float32) for i in range(3)]
    model = nn.Sequential(layer, nn.ReLU())
    calibrate_batch_average(model, (torch.from_numpy(x) for x in xs), 3, progress=False)
    mean, var = R.batch_average([R.batch_stats(x) for x in xs])
    np.testing.assert_allclose(layer.running_mean.reshape(-1), mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var.reshape(-1), var, rtol=1e-6)


def test_later_layers_see_batch_normalized_activations():
    """sn2's statistics are those of its input with sn computing batch statistics (training mode)."""
    model, xs = _model(), _data()
    ref = _model()
    calibrate_batch_average(model, (torch.from_numpy(x) for x in xs), 4, progress=False)
    stats = []
    for x in xs:
        t = torch.from_numpy(x).double()
        sd = {k: v.double() for k, v in ref.sn.state_dict().items()}
        h = torch.from_numpy(R.switchable_norm_from_state(sd, t.numpy(), training=True)).float()
        with torch.no_grad():
            h = ref.bn(ref.conv(h))  # BN stays in eval: its stored statistics
        stats.append(R.batch_stats(h.numpy()))
    mean, var = R.batch_average(stats)
    np.testing.assert_allclose(model.sn2.running_mean.reshape(-1), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.sn2.running_var.reshape(-1), var, rtol=1e-4, atol=1e-6)


def test_precise_bn_normalizes_with_batch_stats_and_leaves_the_rest():
    """With precise_bn, BN behaves like SN's BN branch during the pass; no parameter moves."""
    model, xs = _model(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_batch_average(model, (torch.from_numpy(x) for x in xs), 4, precise_bn=True,
                            progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{l}.running_{s}" for l in ("sn", "sn2", "sn1d", "bn")
                       for s in ("mean", "var")}
    ref = _model()
    ref.sn.train()
    stats = []
    for x in xs:
        with torch.no_grad():
            h = ref.conv(ref.sn(torch.from_numpy(x)))
            h = torch.nn.functional.batch_norm(h, None, None, ref.bn.weight, ref.bn.bias, True,
                                               0.0, ref.bn.eps)
        stats.append(R.batch_stats(h.numpy()))
    mean, var = R.batch_average(stats)
    np.testing.assert_allclose(model.sn2.running_mean.reshape(-1), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.sn2.running_var.reshape(-1), var, rtol=1e-4, atol=1e-6)


def test_observers_and_flags_restored_after_a_failure():
    model = _model()
    model.sn.train()  # a caller's own flag must come back as it was
    mine = lambda *a: None  # noqa: E731
    model.sn2.batch_stats_observer = mine
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [torch.from_numpy(_data()[0]), torch.zeros(5, 3, 6)]  # second batch: wrong rank
    with pytest.raises(InputError, match="rejects calibration batch 1 of shape"):
        calibrate_batch_average(model, bad, 2, progress=False)
    assert model.sn.training and not model.sn2.training
    assert model.sn2.batch_stats_observer is mine and model.sn.batch_stats_observer is None
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_model_without_sn_is_refused():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match="nothing to calibrate"):
        calibrate_batch_average(plain, [torch.zeros(2, 3, 6, 6)], 1, progress=False)
    no_bn_branch = nn.Sequential(SwitchNorm2d(3, using_bn=False))
    with pytest.raises(InputError, match="using_bn=False"):
        calibrate_batch_average(no_bn_branch, [torch.zeros(2, 3, 6, 6)], 1, progress=False)
    calibrate_batch_average(plain, [torch.randn(2, 3, 6, 6)], 1, precise_bn=True, progress=False)


def test_progress_bar_runs(capsys):
    model = _model()
    calibrate_batch_average(model, (torch.from_numpy(x) for x in _data()), 4, progress=True)
    assert model.sn.running_var.abs().sum() > 0
