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
from sn_deploy.nn import SwitchNorm1d, SwitchNorm2d
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
