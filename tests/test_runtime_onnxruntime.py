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
    assert rt.implementation() in ("native-cpu", "reference")


def test_bad_model_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        rt.create_session(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputError, match="ONNX"):
        rt.create_session(tmp_path / "bad.onnx")
