"""--arch inferred from a checkpoint's keys and shapes: every built-in architecture is recognised
exactly, near misses and strangers are refused with one line naming candidates and the flag, and
``sn-export model.pth`` alone exports an official-layout ResNet-50 v1 SN checkpoint."""
from __future__ import annotations

import time

import onnx
import pytest
import torch

from sn_deploy.checkpoint import load_checkpoint, save_checkpoint_like
from sn_deploy.cli import calibrate as cli_calibrate
from sn_deploy.cli import export as cli_export
from sn_deploy.models import ARCHITECTURES, build_model, infer, native_input_shape
from sn_deploy.models.infer import ArchInferenceError, infer_architecture, matching_architectures
from tests.conftest import randomize_sn
from tests.test_cli import assert_one_line_error, run_cli


def _meta_state_dict(arch: str, **kwargs) -> dict:
    """Keys and shapes of a built-in model, without memory (inference reads shapes only)."""
    with torch.device("meta"):
        return build_model(arch, **kwargs).state_dict()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_builtin_architecture_is_recognised(arch):
    assert infer_architecture(_meta_state_dict(arch)) == arch


@pytest.mark.parametrize("arch", ["resnetv1sn50", "resnetv2sn18", "resnetv1ssn34", "demo_sn_net"])
def test_the_class_count_is_free(arch):
    assert matching_architectures(_meta_state_dict(arch, num_classes=7)) == [arch]


def test_inference_is_cached_and_cheap():
    sd = _meta_state_dict("face_resnet50_se_sn")
    infer_architecture(sd)                      # first call: signatures built on the meta device
    start = time.perf_counter()
    for _ in range(20):
        assert infer_architecture(sd) == "face_resnet50_se_sn"
    assert (time.perf_counter() - start) / 20 < 0.5  # generous: a shared 2-core machine


def test_one_missing_key_is_no_match_and_names_the_closest():
    sd = _meta_state_dict("resnetv1sn18")
    sd.pop("layer3.1.sn2.var_weight")
    with pytest.raises(ArchInferenceError) as exc:
        infer_architecture(sd, "'r18.pth'")
    message = str(exc.value)
    assert "'r18.pth' match no built-in architecture" in message
    assert "closest: resnetv1sn18 (1 key differs)" in message
    assert "pass --arch" in message and "\n" not in message
    assert exc.value.candidates[0] == "resnetv1sn18" and not exc.value.ambiguous


def test_a_wrong_shape_is_no_match():
    sd = _meta_state_dict("face_resnet18_sn")
    sd["layer2.0.norm1.mean_weight"] = torch.empty(2, device="meta")  # a no-BN layer: not ours
    with pytest.raises(ArchInferenceError, match=r"closest: face_resnet18_sn \(1 key differs\)"):
        infer_architecture(sd)


def test_a_foreign_model_lists_the_builtin_families():
    with pytest.raises(ArchInferenceError) as exc:
        infer_architecture({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(3)})
    message = str(exc.value)
    assert "top-level modules decoder, encoder are those of none of" in message
    assert "resnetv1sn18/34/50/101/152" in message and "face_resnet18/34/50/100/101/152_sn" in message
    assert "--arch package.module:factory" in message


@pytest.fixture
def duplicated_registry(monkeypatch):
    """A second name for the same factory: a registry in which a layout is ambiguous."""
    monkeypatch.setitem(ARCHITECTURES, "resnetv1sn18_copy", ARCHITECTURES["resnetv1sn18"])
    infer.clear_cache()
    yield
    monkeypatch.undo()
    infer.clear_cache()


def test_several_matches_are_listed(duplicated_registry):
    with pytest.raises(ArchInferenceError) as exc:
        infer_architecture(_meta_state_dict("resnetv1sn18"))
    assert "match several built-in architectures (resnetv1sn18, resnetv1sn18_copy); pass --arch " \
           "with one of them" in str(exc.value)
    assert exc.value.ambiguous and exc.value.candidates == ["resnetv1sn18", "resnetv1sn18_copy"]


def test_cli_ambiguous_is_one_line(duplicated_registry, tmp_path, capsys, monkeypatch):
    torch.save(build_model("resnetv1sn18", num_classes=10).state_dict(), tmp_path / "r.pth")
    code, out, err = run_cli(cli_export.main, [tmp_path / "r.pth"], capsys, monkeypatch)
    assert_one_line_error(code, err, "several built-in architectures (resnetv1sn18, "
                                     "resnetv1sn18_copy); pass --arch with one of them")
    assert not (tmp_path / "r_export").exists()  # nothing left beside the checkpoint


def test_cli_no_match_is_one_line_for_export_and_calibrate(tmp_path, capsys, monkeypatch):
    sd = build_model("resnetv1sn18", num_classes=10).state_dict()
    sd.pop("fc.bias")
    torch.save({"state_dict": sd}, tmp_path / "r.pth")
    code, _, err = run_cli(cli_export.main, [tmp_path / "r.pth"], capsys, monkeypatch)
    assert_one_line_error(code, err, "closest: resnetv1sn18 (1 key differs)")
    assert "pass --arch" in err
    assert not (tmp_path / "r_export").exists()
    code, _, err = run_cli(cli_calibrate.main, [tmp_path / "r.pth", "--data", tmp_path / "x.npy",
                                                "-o", tmp_path / "c.pth"], capsys, monkeypatch)
    assert_one_line_error(code, err, "'r.pth' match no built-in architecture")


def test_native_input_shapes():
    assert native_input_shape("resnetv2sn101") == (1, 3, 224, 224)
    assert native_input_shape("face_resnet100_se_sn", batch=4) == (4, 3, 112, 112)
    assert native_input_shape("tests.conftest:whatever") is None


def test_user_factory_without_input_shape_is_refused(tmp_path, capsys, monkeypatch):
    torch.save(build_model("demo_sn_net").state_dict(), tmp_path / "d.pth")
    code, _, err = run_cli(cli_export.main, [tmp_path / "d.pth", "--arch",
                                             "sn_deploy.models.demo:demo_sn_net"],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, "no native input shape is known for --arch "
                                     "sn_deploy.models.demo:demo_sn_net; pass --input-shape")


def test_pickled_module_needs_no_arch(tmp_path):
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save(model, tmp_path / "whole.pth")
    loaded = load_checkpoint(tmp_path / "whole.pth", trust_pickle=True)
    assert loaded.arch_source == "pickled" and loaded.arch == "demo_sn_net"
    assert loaded.model is loaded.container
    assert loaded.notes() == ["arch: the pickled DemoSNNet module of 'whole.pth' (the layout of "
                              "demo_sn_net)", "adopted 0 SN layers; 4 sn_deploy SN layers as they are"]


def test_pickled_dataparallel_module_is_unwrapped_and_written_back(tmp_path):
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save(torch.nn.DataParallel(model), tmp_path / "dp.pth")
    loaded = load_checkpoint(tmp_path / "dp.pth", trust_pickle=True)
    assert type(loaded.model).__name__ == "DemoSNNet" and loaded.arch == "demo_sn_net"
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    save_checkpoint_like(loaded, loaded.model, tmp_path / "dp2.pth")
    again = torch.load(tmp_path / "dp2.pth", weights_only=False)
    assert isinstance(again, torch.nn.DataParallel)
    for (k, a), b in zip(again.module.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_sn_export_with_only_an_official_resnet50_checkpoint(tmp_path, capsys, monkeypatch):
    """The official ImageNet layout: a dict with epoch/best_prec1/optimizer and DDP-prefixed keys."""
    torch.manual_seed(0)
    model = randomize_sn(build_model("resnetv1sn50"))
    torch.save({"epoch": 100, "arch": "resnetv1sn50", "best_prec1": 76.9, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "model.pth")
    code, out, err = run_cli(cli_export.main, [tmp_path / "model.pth"], capsys, monkeypatch)
    assert code == 0, err
    out_dir = tmp_path / "model_export"
    assert "arch: resnetv1sn50, inferred from the keys and shapes of 'model.pth'" in out
    assert "input: 1x3x224x224 (batch dynamic), the native size of resnetv1sn50" in out
    assert f"output folder: {out_dir}" in out and "PASSED" in out
    sn = onnx.load(out_dir / "model.sn.onnx", load_external_data=False)
    dims = sn.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert sum(n.op_type == "SwitchableNorm" for n in sn.graph.node) == 53
    assert {p.name for p in out_dir.iterdir()} >= {"model.onnx", "model.sn.onnx", "report.json"}
