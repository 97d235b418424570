"""Session factory: providers by availability, the custom-op form, clear errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

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
def test_native_op_refuses_degenerate_planes(rng):
    model, _ = sn_model((2, 3, 6, 6), dynamic=(0, 2, 3))
    sess = rt.create_session(model)
    with pytest.raises(Exception, match="unbiased variance divides by zero"):
        sess.run(None, {"X": np.ones((1, 3, 1, 1), np.float32)})
