"""model.sn.onnx: one SwitchableNorm node per SN layer, correct attributes, names and refusals."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sn_deploy import onnx_ops, reference as R
from sn_deploy.errors import InputError
from sn_deploy.export import export_sn_onnx, parse_shape, save_model_atomic
from sn_deploy.models import build_model
from sn_deploy.nn import SwitchNorm2d, SwitchNorm3d, switch_norm_layers
from tests.conftest import randomize_sn


def _sn_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type == onnx_ops.OP_TYPE]


@pytest.fixture(scope="module")
def demo():
    return randomize_sn(build_model("demo_sn_net", num_classes=10))


@pytest.fixture(scope="module")
def demo_onnx(demo):
    return export_sn_onnx(demo, (4, 1, 8, 8), dynamic_batch=True)


def test_one_node_per_layer_with_official_weights(demo, demo_onnx):
    layers = dict(switch_norm_layers(demo))
    nodes = _sn_nodes(demo_onnx)
    assert [n.name for n in nodes] == list(layers)
    assert all(n.domain == onnx_ops.DOMAIN for n in nodes)
    assert any(o.domain == onnx_ops.DOMAIN and o.version == 1 for o in demo_onnx.opset_import)
    for node in nodes:
        layer = layers[node.name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        np.testing.assert_allclose(attrs["mean_weights"], R.softmax(layer.mean_weight.detach()), rtol=1e-6)
        np.testing.assert_allclose(attrs["var_weights"], R.softmax(layer.var_weight.detach()), rtol=1e-6)
        assert attrs["epsilon"] == pytest.approx(1e-5)
        assert attrs["relu"] == 0
        assert list(node.input[1:]) == [f"{node.name}.{k}" for k in
                                        ("weight", "bias", "running_mean", "running_var")]
        assert list(node.output) == [f"{node.name}.output"]
        meta = {p.key: p.value for p in node.metadata_props}
        assert meta[onnx_ops.LAYER_NAME_KEY] == node.name
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in demo_onnx.graph.initializer}
    np.testing.assert_array_equal(inits["sn3.running_var"], layers["sn3"].running_var.reshape(-1).numpy())


def test_checker_and_dynamic_batch(demo_onnx):
    onnx.checker.check_model(demo_onnx, full_check=True)
    dims = demo_onnx.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [i.name for i in demo_onnx.graph.input] == ["input"]
    assert [o.name for o in demo_onnx.graph.output] == ["output"]


class _Tiny(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3) if isinstance(norm, SwitchNorm2d) else torch.nn.Conv3d(3, 4, 3)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x))


def test_using_bn_off_has_no_running_stats():
    model = randomize_sn(_Tiny(SwitchNorm2d(4, using_bn=False)))
    node = _sn_nodes(export_sn_onnx(model, (1, 3, 9, 9)))[0]
    assert list(node.input[1:]) == ["norm.weight", "norm.bias"]
    assert len(onnx.helper.get_attribute_value(node.attribute[1])) == 2


def test_3d_and_dynamic_spatial():
    model = randomize_sn(_Tiny(SwitchNorm3d(4)))
    proto = export_sn_onnx(model, (2, 3, 5, 6, 7), dynamic_batch=True, dynamic_spatial=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1)
    assert len(_sn_nodes(proto)) == 1


def test_degenerate_spatial_shape_refused():
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    with pytest.raises(InputError, match=r"layer4\.0\.sn1.*larger input shape"):
        export_sn_onnx(model, (1, 3, 32, 32))


def test_wrong_input_shape_refused(demo):
    with pytest.raises(InputError, match="does not accept input shape"):
        export_sn_onnx(demo, (1, 3, 8, 8))


def test_model_without_sn_layer_exports():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    proto = export_sn_onnx(model, (1, 3, 8, 8))
    assert not _sn_nodes(proto)


@pytest.mark.parametrize("text", ["", "1x3", "1xax3", "0x3x8x8", "1x-3x8"])
def test_parse_shape_errors(text):
    if text == "1x3":
        assert parse_shape(text) == (1, 3)
        return
    with pytest.raises(InputError, match="invalid shape"):
        parse_shape(text)


def test_save_atomic(tmp_path, demo_onnx):
    out = save_model_atomic(demo_onnx, tmp_path / "m.onnx")
    assert onnx.load(out).graph.node
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_opset_17_is_really_17(demo):
    proto = export_sn_onnx(demo, (2, 1, 8, 8), opset=17)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    onnx.checker.check_model(proto, full_check=True)
    from sn_deploy.passes.decompose import decompose_model
    from sn_deploy.runtime.onnxruntime import create_session

    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = demo(torch.from_numpy(x)).numpy()
    for form in (proto, decompose_model(proto)):
        np.testing.assert_allclose(create_session(form).run(None, {"input": x})[0], ref,
                                   rtol=1e-4, atol=1e-5)


def test_opset_too_old(demo):
    with pytest.raises(InputError, match="use 17 or newer"):
        export_sn_onnx(demo, (2, 1, 8, 8), opset=16)
