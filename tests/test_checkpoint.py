"""Checkpoint loading: official layout, DDP prefix, strict errors, pickle safety, atomic save."""
from __future__ import annotations

import pytest
import torch

from sn_deploy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint_like
from sn_deploy.errors import OutputError
from sn_deploy.models import build_model
from tests.conftest import randomize_sn


@pytest.fixture(scope="module")
def model():
    return randomize_sn(build_model("resnetv1sn18", num_classes=10))


def _official(model, prefix="module."):
    return {"epoch": 90, "best_prec1": 76.9, "optimizer": {"state": {}, "param_groups": []},
            "state_dict": {prefix + k: v for k, v in model.state_dict().items()}}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["official", "bare", "model_key", "bare_prefixed"])
def test_layouts_load_strictly(layout, model, tmp_path):
    sd = model.state_dict()
    obj = {"official": _official(model), "bare": sd, "model_key": {"model": sd, "epoch": 3},
           "bare_prefixed": {"module." + k: v for k, v in sd.items()}}[layout]
    torch.save(obj, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")
    assert _same_weights(loaded.model, model)
    assert not loaded.model.training
    assert loaded.prefixed == (layout in ("official", "bare_prefixed"))


def test_round_trip_keeps_layout(model, tmp_path):
    torch.save(_official(model), tmp_path / "in.pth")
    loaded = load_checkpoint(tmp_path / "in.pth", "resnetv1sn18")
    with torch.no_grad():
        loaded.model.sn1.running_mean.add_(1.0)
    save_checkpoint_like(loaded, loaded.model, tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(out) == {"epoch", "best_prec1", "optimizer", "state_dict"}
    assert out["epoch"] == 90 and all(k.startswith("module.") for k in out["state_dict"])
    assert torch.equal(out["state_dict"]["module.sn1.running_mean"],
                       model.sn1.running_mean + 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth", "out.pth"]


def test_num_classes_inferred(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "c.pth")
    assert load_checkpoint(tmp_path / "c.pth", "resnetv1sn18").model.fc.out_features == 10


def test_wrong_arch_lists_keys(model, tmp_path):
    torch.save(_official(model), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"does not match --arch resnetv1sn50: .*missing.*wrong --arch"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn50")


def test_extra_prefix_hint(model, tmp_path):
    torch.save({"net." + k: v for k, v in model.state_dict().items()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"extra 'net\.' prefix"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")


def test_missing_key_is_refused_not_half_loaded(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["layer2.0.sn1.running_var"]
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"1 missing: layer2\.0\.sn1\.running_var"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")


def test_pickled_module_needs_trust(model, tmp_path):
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(tmp_path / "whole.pth", "resnetv1sn18")
    loaded = load_checkpoint(tmp_path / "whole.pth", "resnetv1sn18", trust_pickle=True)
    assert _same_weights(loaded.model, model)


@pytest.mark.parametrize("content,match", [
    (None, "not found"), (b"garbage bytes", "not a readable PyTorch checkpoint"),
])
def test_unreadable_files(content, match, tmp_path):
    path = tmp_path / "c.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, "resnetv1sn18")


def test_not_a_checkpoint(tmp_path):
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="no state_dict found"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")


def test_unknown_arch(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="unknown --arch 'resnet9000'"):
        load_checkpoint(tmp_path / "c.pth", "resnet9000")


def test_user_factory(tmp_path):
    m = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save(m.state_dict(), tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth", "sn_deploy.models.demo:demo_sn_net")
    assert _same_weights(loaded.model, m)


def test_numpy_scalars_and_legacy_format_load_safely(model, tmp_path):
    """Real training scripts store best_prec1 as a numpy scalar, and old torch used a tar format."""
    import numpy as np

    obj = {"epoch": 90, "best_prec1": np.float64(76.9), "state_dict": model.state_dict()}
    torch.save(obj, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "legacy.pth", "resnetv1sn18")
    assert _same_weights(loaded.model, model)
    save_checkpoint_like(loaded, loaded.model, tmp_path / "out.pth")
    assert load_checkpoint(tmp_path / "out.pth", "resnetv1sn18").container["best_prec1"] == 76.9


def test_weights_only_refusal_names_the_global(tmp_path):
    import argparse  # training scripts often store their argparse options

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*--trust-pickle"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")


def test_pickled_module_is_still_matched_strictly_and_saved_as_a_module(model, tmp_path):
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="does not match --arch resnetv1sn50"):
        load_checkpoint(tmp_path / "whole.pth", "resnetv1sn50", trust_pickle=True)
    loaded = load_checkpoint(tmp_path / "whole.pth", "resnetv1sn18", trust_pickle=True)
    with torch.no_grad():
        loaded.model.sn1.running_var.add_(2.0)
    save_checkpoint_like(loaded, loaded.model, tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=False)
    assert type(out) is type(model)
    assert torch.equal(out.sn1.running_var, model.sn1.running_var + 2.0)
    assert torch.equal(loaded.container.sn1.running_var, model.sn1.running_var)  # input untouched


def test_shape_mismatch_lists_shapes_and_hints_num_classes(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: fc\.weight \(10, 512\) vs "
                                              r"\(7, 512\).*num_classes"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn18", arch_kwargs={"num_classes": 7})


def test_many_missing_keys_are_shortened(model, tmp_path):
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("layer")},
               tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"missing: (\S+, ){4}\S+ \(\+\d+ more\)"):
        load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")


def test_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path, "resnetv1sn18")


def test_failed_save_leaves_nothing_behind(model, tmp_path, monkeypatch):
    torch.save(_official(model), tmp_path / "in.pth")
    loaded = load_checkpoint(tmp_path / "in.pth", "resnetv1sn18")
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint_like(loaded, loaded.model, tmp_path / "nope" / "out.pth")

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OutputError, match="cannot write '.*out.pth' \\(No space left"):
        save_checkpoint_like(loaded, loaded.model, tmp_path / "out.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


def test_save_over_existing_output_is_a_replacement(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth", "resnetv1sn18")
    (tmp_path / "out.pth").write_bytes(b"old")
    save_checkpoint_like(loaded, loaded.model, tmp_path / "out.pth")
    assert _same_weights(load_checkpoint(tmp_path / "out.pth", "resnetv1sn18").model, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "out.pth"]
