"""Session factory: providers by availability, the custom-op form, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from sn_deploy import onnx_ops
from sn_deploy.passes.decompose import decompose_model

from sn_deploy.errors import InputError
from sn_deploy.runtime import onnxruntime as rt
from tests.test_decompose import ref, sn_model


def test_cpu_only_without_a_gpu():
    if rt.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    assert rt.default_providers() == ["CPUExecutionProvider"]


def test_custom_op_threads_and_file_untouched(tmp_path, rng):
    model, p = sn_model((2, 3, 5, 5), using_bn=False)
    onnx.save(model, tmp_path / "m.sn.onnx")
    before = (tmp_path / "m.sn.onnx").read_bytes()
    sess = rt.create_session(tmp_path / "m.sn.onnx", threads=1)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(rt.run(sess, {"X": x})["l.output"], ref(x, p), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "m.sn.onnx").read_bytes() == before
    info = rt.session_info(sess)
    assert info["providers"] == rt.default_providers() and info["inputs"][0]["name"] == "X"
    assert rt.implementation() in ("native-ort-op", "native-cpu", "reference")


def test_bad_model_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        rt.create_session(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputError, match="ONNX"):
        rt.create_session(tmp_path / "bad.onnx")


@pytest.mark.parametrize("shape,using_bn,relu", [
    ((2, 5, 7, 7), True, False), ((1, 3, 6, 6), False, False), ((4, 9), True, False),
    ((2, 3, 3, 4, 5), True, True), ((3, 5, 7, 11), False, True),
])
def test_python_custom_op_matches_reference(shape, using_bn, relu, rng):
    """The onnxruntime-extensions route (forced even where the native library is built)."""
    model, p = sn_model(shape, using_bn, relu=relu)
    x = rng.normal(0.5, 2.0, size=shape).astype(np.float32)
    sess = rt.create_session(model, native_op=False, threads=1)
    np.testing.assert_allclose(rt.run(sess, {"X": x})["l.output"], ref(x, p, relu=relu),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,using_bn,relu", [((2, 5, 7, 7), True, True),
                                                 ((3, 4, 6, 6), False, False), ((4, 9), True, True)])
def test_python_custom_op_with_residual(shape, using_bn, relu, rng):
    model, p = sn_model(shape, using_bn, relu=relu, residual=True)
    x = rng.normal(0.5, 2.0, size=shape).astype(np.float32)
    r = rng.normal(size=shape).astype(np.float32)
    sess = rt.create_session(model, native_op=False, threads=1)
    np.testing.assert_allclose(rt.run(sess, {"X": x, "R": r})["l.output"],
                               ref(x, p, relu=relu, residual=r), rtol=1e-5, atol=1e-5)


def test_python_custom_op_reference_fallback(monkeypatch, rng):
    """Without the compiled kernel the op computes with the float64 reference, cast to float32."""
    from sn_deploy import ops

    monkeypatch.setattr(ops, "available", lambda: False)
    monkeypatch.setattr(rt, "native_op_library", lambda: None)
    assert rt.implementation() == "reference"
    model, p = sn_model((2, 4, 5, 6))
    x = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    y = rt.run(rt.create_session(model), {"X": x})["l.output"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref(x, p), rtol=1e-6, atol=1e-6)
    model, p = sn_model((2, 4, 5, 6), relu=True, residual=True)
    r = rng.normal(size=x.shape).astype(np.float32)
    y = rt.run(rt.create_session(model), {"X": x, "R": r})["l.output"]
    np.testing.assert_allclose(y, ref(x, p, relu=True, residual=r), rtol=1e-6, atol=1e-6)


def test_python_custom_op_model_form():
    """In-memory copy: same domain and op, weight lists as JSON strings, six inputs."""
    model, p = sn_model((2, 3, 5, 5), using_bn=False)
    before = model.SerializeToString()
    node = rt._for_pyop(model).graph.node[0]
    assert (node.domain, node.op_type) == (onnx_ops.DOMAIN, onnx_ops.OP_TYPE)
    assert len(node.input) == 6
    assert node.input[3] == node.input[4] == node.input[5] == "sn_deploy.empty"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    np.testing.assert_allclose(np.array(json.loads(attrs["mean_weights"])), p["mw"], rtol=1e-7)
    assert model.SerializeToString() == before


def test_python_custom_op_refuses_float16():
    model, _ = sn_model((2, 4, 8, 8), dtype=np.float16)
    with pytest.raises(InputError, match="float32 models only"):
        rt.create_session(model, native_op=False)


def test_session_options_and_providers():
    model, _ = sn_model((2, 3, 4, 4))
    sess = rt.create_session(decompose_model(model), threads=1, providers=["CPUExecutionProvider"])
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert sess.get_providers() == ["CPUExecutionProvider"]
    spin = rt.create_session(decompose_model(model), spinning=True).get_session_options()
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    info = rt.session_info(sess)
    assert info["outputs"] == [{"name": "l.output", "shape": [2, 3, 4, 4], "type": "tensor(float)"}]


def test_no_log_spam_on_cpu(tmp_path):
    """A CPU user of onnxruntime-gpu sees nothing on stderr: both model forms, in a fresh process."""
    model, _ = sn_model((2, 3, 4, 4))
    onnx.save(model, tmp_path / "m.sn.onnx")
    onnx.save(decompose_model(model), tmp_path / "m.onnx")
    code = textwrap.dedent(f"""
        import numpy as np
        from sn_deploy.runtime.onnxruntime import create_session
        for name in ("m.sn.onnx", "m.onnx"):
            for native in (True, False):
                s = create_session(r"{tmp_path}/" + name, native_op=native)
                s.run(None, {{"X": np.ones((2, 3, 4, 4), np.float32)}})
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if rt.cuda_device_count() == 0:
        assert proc.stderr == ""


native = pytest.mark.skipif(rt.native_op_library() is None,
                            reason="libsn_ort_op.so not built (needs ONNX Runtime headers: make plugins)")


@native
@pytest.mark.parametrize("shape,using_bn", [((2, 5, 7, 7), True), ((1, 3, 6, 6), False),
                                            ((4, 9), True), ((2, 3, 3, 4, 5), True),
                                            ((4, 64, 40, 40), True)])
def test_native_op_library_matches_reference_and_pyop(shape, using_bn, rng):
    model, p = sn_model(shape, using_bn)
    x = rng.normal(0.5, 2.0, size=shape).astype(np.float32)
    native_y = rt.create_session(model, threads=2).run(None, {"X": x})[0]
    np.testing.assert_allclose(native_y, ref(x, p), rtol=1e-5, atol=1e-5)
    py_y = rt.create_session(model, native_op=False).run(None, {"X": x})[0]
    np.testing.assert_allclose(native_y, py_y, rtol=1e-6, atol=1e-6)


@native
def test_native_op_fp16_and_relu(rng):
    model, p = sn_model((2, 4, 8, 8), dtype=np.float16, relu=True)
    x = rng.normal(2.0, 1.0, size=(2, 4, 8, 8)).astype(np.float16)
    y = rt.create_session(model).run(None, {"X": x})[0]
    assert y.dtype == np.float16 and (y >= 0).all()
    np.testing.assert_allclose(y.astype(np.float64), ref(x.astype(np.float64), p, relu=True), atol=1e-2)


@native
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape,using_bn", [((2, 5, 7, 7), True), ((1, 3, 6, 6), False),
                                            ((4, 9), True), ((4, 64, 40, 40), True)])
def test_native_op_with_residual_matches_reference(shape, using_bn, dtype, rng):
    """The 6th input: relu(SN(x) + residual) on ORT's threads, fp32 and fp16."""
    model, p = sn_model(shape, using_bn, relu=True, residual=True, dtype=dtype)
    x = rng.normal(0.5, 2.0, size=shape).astype(dtype)
    r = rng.normal(size=shape).astype(dtype)
    y = rt.create_session(model, threads=2).run(None, {"X": x, "R": r})[0]
    assert y.dtype == dtype
    tol = dict(rtol=2e-3, atol=4e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    expected = ref(x.astype(np.float64), p, relu=True, residual=r.astype(np.float64))
    np.testing.assert_allclose(y.astype(np.float64), expected, **tol)
    if dtype == np.float32:
        py_y = rt.create_session(model, native_op=False).run(None, {"X": x, "R": r})[0]
        np.testing.assert_allclose(y, py_y, rtol=1e-6, atol=1e-6)


@native
def test_native_op_refuses_a_residual_of_another_shape(rng):
    model, _ = sn_model((2, 3, 6, 6), residual=True)
    for i, d in enumerate(model.graph.input[1].type.tensor_type.shape.dim):
        d.dim_param = f"r{i}"  # a dynamic residual: only the op itself can check it
    sess = rt.create_session(model)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    with pytest.raises(Exception, match="residual must have the type and shape of X"):
        sess.run(None, {"X": x, "R": np.ones((2, 3, 6, 1), np.float32)})


@native
def test_native_op_refuses_degenerate_planes(rng):
    model, _ = sn_model((2, 3, 6, 6), dynamic=(0, 2, 3))
    sess = rt.create_session(model)
    with pytest.raises(Exception, match="unbiased variance divides by zero"):
        sess.run(None, {"X": np.ones((1, 3, 1, 1), np.float32)})
