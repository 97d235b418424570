"""The TensorRT mapping pass: node form, fields, ReLU folding."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.to_plugin import PLUGIN_DOMAIN, PLUGIN_OP, to_plugin_model
from tests.conftest import randomize_sn
from tests.test_decompose import sn_model


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _with_relu(model, extra_consumer=False):
    g = model.graph
    g.node.append(helper.make_node("Relu", ["l.output"], ["r"]))
    outs = [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 5, 7, 7])]
    if extra_consumer:
        g.node.append(helper.make_node("Neg", ["l.output"], ["n"]))
        outs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [2, 5, 7, 7]))
    del g.output[:]
    g.output.extend(outs)
    return model


def test_fields_and_single_input():
    model, p = sn_model((2, 5, 7, 7))
    out = to_plugin_model(model)
    (node,) = out.graph.node
    assert node.op_type == PLUGIN_OP and node.domain == PLUGIN_DOMAIN
    assert list(node.input) == ["X"] and list(node.output) == ["l.output"]
    a = _attrs(node)
    assert a["plugin_version"] == b"1" and a["plugin_namespace"] == b""
    np.testing.assert_allclose(a["mean_weights"], p["mw"], rtol=1e-6)
    np.testing.assert_allclose(a["var_weights"], p["vw"], rtol=1e-6)
    assert a["relu"] == 0 and a["rank2"] == 0 and a["epsilon"] == pytest.approx(1e-5)
    for k in ("scale", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a[k]), p[k])
    assert not out.graph.initializer
    assert all(o.domain != "sn_deploy" for o in out.opset_import)


def test_using_bn_off_and_rank2():
    model, _ = sn_model((2, 5, 7, 7), using_bn=False)
    a = _attrs(to_plugin_model(model).graph.node[0])
    assert "running_mean" not in a and len(a["mean_weights"]) == 2
    model, _ = sn_model((4, 9))
    a = _attrs(to_plugin_model(model).graph.node[0])
    assert a["rank2"] == 1 and len(a["var_weights"]) == 2


def test_relu_folded():
    model, _ = sn_model((2, 5, 7, 7))
    out = to_plugin_model(_with_relu(model))
    (node,) = out.graph.node
    assert _attrs(node)["relu"] == 1 and list(node.output) == ["r"]


def test_relu_not_folded_with_other_consumers_or_when_disabled():
    model, _ = sn_model((2, 5, 7, 7))
    out = to_plugin_model(_with_relu(model, extra_consumer=True))
    assert [n.op_type for n in out.graph.node].count("Relu") == 1
    assert _attrs(out.graph.node[0])["relu"] == 0
    model, _ = sn_model((2, 5, 7, 7))
    out = to_plugin_model(_with_relu(model), fuse_relu=False)
    assert "Relu" in [n.op_type for n in out.graph.node]


def test_resnet_export_maps_every_layer():
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    out = to_plugin_model(export_sn_onnx(model, (1, 3, 64, 64)))
    ops = [n.op_type for n in out.graph.node]
    assert ops.count(PLUGIN_OP) == 20
    # sn1 and every block's first SN are followed by their own ReLU: folded
    folded = sum(_attrs(n)["relu"] for n in out.graph.node if n.op_type == PLUGIN_OP)
    assert folded == 9


def test_fields_reproduce_the_reference():
    """The node's attributes alone carry the layer: the reference fed from them matches."""
    from sn_deploy import reference as R
    from tests.test_decompose import ref

    model, p = sn_model((2, 5, 7, 7))
    a = _attrs(to_plugin_model(_with_relu(model)).graph.node[0])
    t = lambda k: onnx.numpy_helper.to_array(a[k])  # noqa: E731
    x = np.random.default_rng(1).normal(size=(2, 5, 7, 7))
    y = R.switchable_norm(x, t("scale"), t("bias"), a["mean_weights"], a["var_weights"],
                          t("running_mean"), t("running_var"), eps=a["epsilon"], relu=bool(a["relu"]))
    np.testing.assert_allclose(y, ref(x, p, relu=True), rtol=1e-6, atol=1e-6)


def test_fp16_parameters_become_fp32_fields():
    model, p = sn_model((2, 5, 7, 7), dtype=np.float16)
    for init in model.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(
            onnx.numpy_helper.to_array(init).astype(np.float16), init.name))
    a = _attrs(to_plugin_model(model).graph.node[0])
    assert a["scale"].data_type == TensorProto.FLOAT
    np.testing.assert_allclose(onnx.numpy_helper.to_array(a["scale"]), p["scale"], rtol=1e-3)


def test_relu_not_folded_when_sn_output_is_a_graph_output():
    model, _ = sn_model((2, 5, 7, 7))
    model = _with_relu(model)
    model.graph.output.append(helper.make_tensor_value_info("l.output", TensorProto.FLOAT,
                                                            [2, 5, 7, 7]))
    out = to_plugin_model(model)
    assert [n.op_type for n in out.graph.node] == [PLUGIN_OP, "Relu"]
    assert _attrs(out.graph.node[0])["relu"] == 0


def test_default_domain_on_request():
    """domain="" (for tools that want it): same node, default domain, no opset for it."""
    model, _ = sn_model((2, 5, 7, 7))
    out = to_plugin_model(model, domain="")
    assert out.graph.node[0].op_type == PLUGIN_OP and out.graph.node[0].domain == ""
    assert {o.domain for o in out.opset_import} == {""}


@pytest.mark.parametrize("using_bn", [True, False])
def test_fused_residual_becomes_the_second_input(using_bn):
    """The residual stays a tensor input (X, residual); the field says so; the fields and the
    residual alone reproduce the reference."""
    from sn_deploy import reference as R
    from tests.test_decompose import ref

    model, p = sn_model((2, 5, 7, 7), using_bn=using_bn, relu=True, residual=True)
    (node,) = to_plugin_model(model).graph.node
    assert list(node.input) == ["X", "R"] and list(node.output) == ["l.output"]
    a = _attrs(node)
    assert a["residual"] == 1 and a["relu"] == 1
    assert ("running_mean" in a) == using_bn
    t = lambda k: onnx.numpy_helper.to_array(a[k]) if k in a else None  # noqa: E731
    rng = np.random.default_rng(2)
    x, r = rng.normal(size=(2, 2, 5, 7, 7))
    y = R.switchable_norm(x, t("scale"), t("bias"), a["mean_weights"], a["var_weights"],
                          t("running_mean"), t("running_var"), eps=a["epsilon"],
                          relu=bool(a["relu"]), residual=r)
    np.testing.assert_allclose(y, ref(x, p, relu=True, residual=r), rtol=1e-6, atol=1e-6)
    (plain,) = to_plugin_model(sn_model((2, 5, 7, 7))[0]).graph.node
    assert _attrs(plain)["residual"] == 0 and list(plain.input) == ["X"]


def test_fused_resnet_maps_residual_blocks():
    from sn_deploy.passes.fuse import fuse_model

    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    out = to_plugin_model(fuse_model(export_sn_onnx(model, (1, 3, 64, 64))))
    plugins = [n for n in out.graph.node if n.op_type == PLUGIN_OP]
    assert len(plugins) == 20 and not {"Add", "Relu"} & {n.op_type for n in out.graph.node}
    two = {n.name: list(n.input)[1] for n in plugins if len(n.input) == 2}
    assert len(two) == 8 and two["layer2.0.sn2"] == "layer2.0.downsample.1.output"
    assert all(_attrs(n)["residual"] == int(n.name in two) for n in plugins)
