"""Adoption of foreign SN layers: official layouts become sn_deploy layers holding the same
tensors and computing what the official forward computes; inconsistent look-alikes are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sn_deploy import nn as sdnn
from sn_deploy.adopt import AdoptionError, adopt_sn_layers, is_sn_like
from sn_deploy.checkpoint import load_checkpoint
from tests import official_layout as off


def _state_ids(model: nn.Module) -> dict[str, int]:
    return {**{k: id(v) for k, v in model.named_parameters()},
            **{k: id(v) for k, v in model.named_buffers()}}


def _adopt_one(layer: nn.Module) -> nn.Module:
    holder = nn.Sequential(layer)
    holder, summary = adopt_sn_layers(holder)
    assert [a.path for a in summary.layers] == ["0"]
    return holder[0]


CASES = {
    "2d": (lambda: off.SwitchNorm2d(6, eps=2e-5, momentum=0.8), (4, 6, 5, 7), sdnn.SwitchNorm2d),
    "2d-no-bn": (lambda: off.SwitchNorm2d(6, using_bn=False), (3, 6, 4, 4), sdnn.SwitchNorm2d),
    "3d": (lambda: off.SwitchNorm3d(5), (3, 5, 3, 4, 2), sdnn.SwitchNorm3d),
    "3d-no-bn": (lambda: off.SwitchNorm3d(5, using_bn=False), (2, 5, 2, 3, 3), sdnn.SwitchNorm3d),
    "1d": (lambda: off.SwitchNorm1d(7, eps=3e-5), (6, 7), sdnn.SwitchNorm1d),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_adopted_layer_is_the_official_layer(case, training):
    make, shape, cls = CASES[case]
    official = off.randomize(make(), seed=3).train(training)
    reference = off.randomize(make(), seed=3).train(training)  # an independent twin
    before = {k: v.clone() for k, v in official.state_dict().items()}
    tensors = {k: v for k, v in list(official.named_parameters()) + list(official.named_buffers())}
    adopted = _adopt_one(official)
    assert type(adopted) is cls and adopted.training == training
    assert adopted.eps == official.eps and adopted.momentum == official.momentum
    # the very same Parameter/buffer objects, the same keys in the same order
    mine = dict(list(adopted.named_parameters()) + list(adopted.named_buffers()))
    assert mine.keys() == tensors.keys() and all(mine[k] is tensors[k] for k in tensors)
    assert all(isinstance(mine[k], nn.Parameter) for k in ("weight", "bias", "mean_weight",
                                                          "var_weight"))
    assert list(adopted.state_dict()) == list(before)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    torch.testing.assert_close(adopted(x), reference(x), rtol=1e-5, atol=1e-5)
    for k, v in reference.state_dict().items():  # the training step updates running stats alike
        torch.testing.assert_close(adopted.state_dict()[k], v, rtol=1e-6, atol=1e-6)


def test_sync_switchable_norm_runs_on_the_cpu_once_adopted():
    sync = off.randomize(off.SyncSwitchableNorm2d(8, eps=2e-5), seed=4).eval()
    x = torch.randn(2, 8, 5, 5)
    with pytest.raises(RuntimeError, match="CUDA"):
        sync(x)
    twin = off.SwitchNorm2d(8, eps=2e-5)
    twin.load_state_dict(sync.state_dict())
    adopted = _adopt_one(sync)
    assert type(adopted) is sdnn.SwitchNorm2d and adopted.using_bn and adopted.eps == 2e-5
    assert adopted.using_moving_average and adopted.momentum == 0.9
    torch.testing.assert_close(adopted(x), twin.eval()(x), rtol=1e-5, atol=1e-5)


def test_sparse_sn_becomes_sparse_switch_norm():
    ssn = off.randomize(off.SSN2d(6), seed=5)
    with torch.no_grad():  # a trained SSN: one-hot weights, fixed
        ssn.mean_weight.copy_(torch.tensor([0.0, 1.0, 0.0]))
        ssn.var_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
        ssn.mean_fixed.fill_(1)
        ssn.var_fixed.fill_(1)
        ssn.radius.fill_(0.7)
    ssn.eval()
    x = torch.randn(3, 6, 4, 4)
    expected = ssn(x)
    buffers = dict(ssn.named_buffers())
    adopted = _adopt_one(ssn)
    assert type(adopted) is sdnn.SparseSwitchNorm2d and adopted.momentum == 0.997
    assert all(dict(adopted.named_buffers())[k] is v for k, v in buffers.items())
    torch.testing.assert_close(adopted(x), expected, rtol=1e-5, atol=1e-5)
    # a free layer: sparsestmax at the stored radius, as sn_deploy's own SSN layer does
    free = off.SSN2d(6)
    with torch.no_grad():
        free.mean_weight.copy_(torch.tensor([0.2, 0.5, 0.3]))
        free.radius.fill_(0.3)
    own = sdnn.SparseSwitchNorm2d(6)
    own.load_state_dict(free.state_dict())
    torch.testing.assert_close(_adopt_one(free).eval()(x), own.eval()(x))


def test_mixed_model_summary_and_untouched_layers():
    model = off.build_mixed_trained()
    gn, bn, own = model.gn, model.bn, model.own
    ids = _state_ids(model)
    model, summary = adopt_sn_layers(model)
    assert summary.counts == {"SwitchNorm2d": 2, "SyncSwitchableNorm2d": 1, "SwitchNorm1d": 1}
    assert summary.native == 1
    assert [a.path for a in summary.layers] == ["norm0", "body.1", "body.4", "head_norm"]
    assert summary.layers[1].original == "tests.official_layout.SyncSwitchableNorm2d"
    assert summary.line() == ("adopted 4 SN layers as sn_deploy layers (2 SwitchNorm2d, "
                              "1 SyncSwitchableNorm2d, 1 SwitchNorm1d); 1 sn_deploy SN layer as "
                              "they are")
    assert model.gn is gn and model.bn is bn and model.own is own
    assert _state_ids(model) == ids
    assert model.norm0.eps == 2e-5
    assert [n for n, _ in sdnn.switch_norm_layers(model)] == ["norm0", "body.1", "body.4", "own",
                                                              "head_norm"]
    assert not any(is_sn_like(m) for m in model.modules())
    again, second = adopt_sn_layers(model)  # idempotent
    assert again is model and not second.layers and second.native == 5
    assert second.line() == "adopted 0 SN layers; 5 sn_deploy SN layers as they are"


def test_mixed_model_output_equals_the_official_classes():
    official = off.build_mixed_trained()
    reference = off.MixedNet(sync=False)  # SyncSN cannot run on a CPU: its SN twin stands in
    reference.load_state_dict(official.state_dict())
    x = torch.randn(3, 3, 16, 16)
    adopted, _ = adopt_sn_layers(official)
    torch.testing.assert_close(adopted.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_root_module_and_shared_module():
    root = off.SwitchNorm2d(4)
    new, summary = adopt_sn_layers(root)
    assert type(new) is sdnn.SwitchNorm2d and summary.layers[0].path == ""
    shared = off.SwitchNorm2d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model, summary = adopt_sn_layers(model)
    assert model[0] is model[2] and type(model[0]) is sdnn.SwitchNorm2d
    assert len(summary.layers) == 1


def test_no_sn_layer_line():
    _, summary = adopt_sn_layers(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    assert summary.line() == "adopted 0 SN layers (the model has no SN layer)"


def _broken(kind: str) -> nn.Module:
    m = off.SwitchNorm2d(4)
    if kind == "no running_var":
        del m._buffers["running_var"]
    elif kind == "bias shape":
        m.bias = nn.Parameter(torch.zeros(1, 5, 1, 1))
    elif kind == "running shape":
        m.running_mean = torch.zeros(1, 3, 1)
    elif kind == "4 branches":
        m.mean_weight = nn.Parameter(torch.ones(4))
        m.var_weight = nn.Parameter(torch.ones(4))
    elif kind == "no var_weight":
        del m._parameters["var_weight"]
    elif kind == "branch lengths":
        m.var_weight = nn.Parameter(torch.ones(2))
    elif kind == "using_bn disagrees":
        m.using_bn = False
    elif kind == "no BN branch but stats":
        m = off.SwitchNorm2d(4, using_bn=False)
        m.register_buffer("running_mean", torch.zeros(1, 4, 1))
        m.register_buffer("running_var", torch.zeros(1, 4, 1))
    elif kind == "sparse without radius":
        m = off.SSN2d(4)
        del m._buffers["radius"]
    elif kind == "extra state":
        m.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
    elif kind == "weight rank":
        m.weight = nn.Parameter(torch.ones(4))
        m.bias = nn.Parameter(torch.zeros(4))
    elif kind == "eps missing":
        del m.eps
    elif kind == "1d with 3 branches":
        m = off.SwitchNorm1d(4)
        m.mean_weight = nn.Parameter(torch.ones(3))
        m.var_weight = nn.Parameter(torch.ones(3))
    return m


@pytest.mark.parametrize("kind,pattern", [
    ("no running_var", "no buffer running_var"),
    ("bias shape", "bias has shape 1x5x1x1 but weight 1x4x1x1"),
    ("running shape", "running_mean has shape 1x3x1, expected 1x4x1"),
    ("4 branches", "unknown branch count 4"),
    ("no var_weight", "no parameter var_weight"),
    ("branch lengths", "mean_weight 3 and var_weight 2"),
    ("using_bn disagrees", "using_bn=False but it has 3 mixing weights"),
    ("no BN branch but stats", "running_mean, running_var but no BN branch"),
    ("sparse without radius", "(no radius)"),
    ("extra state", "would drop (num_batches_tracked)"),
    ("weight rank", "weight has shape 4"),
    ("eps missing", "eps is None"),
    ("1d with 3 branches", "1d SN layer mixes 2 branches"),
])
def test_inconsistent_look_alikes_are_refused_by_path(kind, pattern):
    good = off.SwitchNorm2d(4)
    model = nn.Sequential(good, nn.Sequential(nn.Identity(), _broken(kind)))
    with pytest.raises(AdoptionError) as exc:
        adopt_sn_layers(model)
    message = str(exc.value)
    assert "\n" not in message and "SN-like module '1.1'" in message and pattern in message, message
    assert "--no-adopt" in message
    assert model[0] is good  # nothing replaced when any layer is refused


# --------------------------------------------------------------------------- checkpoints
ARCH = "tests.official_layout:build_mixed"


def test_checkpoint_saved_before_adoption_loads_after_and_back(tmp_path):
    official = off.build_mixed_trained()
    torch.save({"state_dict": official.state_dict(), "epoch": 3}, tmp_path / "official.pth")
    loaded = load_checkpoint(tmp_path / "official.pth", ARCH)
    assert loaded.adoption is not None and len(loaded.adoption.layers) == 4
    assert type(loaded.model.body[1]) is sdnn.SwitchNorm2d
    for k, v in official.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # saved after adoption: loads strictly into the official classes again
    torch.save(loaded.model.state_dict(), tmp_path / "adopted.pth")
    fresh = off.build_mixed()
    fresh.load_state_dict(torch.load(tmp_path / "adopted.pth", weights_only=True), strict=True)
    assert list(fresh.state_dict()) == list(official.state_dict())
    # and with adoption off the model keeps its own classes
    plain = load_checkpoint(tmp_path / "official.pth", ARCH, adopt=False)
    assert plain.adoption is None and type(plain.model.body[1]) is off.SyncSwitchableNorm2d
