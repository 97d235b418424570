"""The demo job in-process: train on digits, calibrate, export, decompose, run in onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sn_deploy.calibrate import calibrate_batch_average
from sn_deploy.data import batches
from sn_deploy.export import export_sn_onnx
from sn_deploy.models.demo import load_digits_split, train_demo_model
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.runtime.onnxruntime import create_session
from sn_deploy.validate import validate


class _Array:
    def __init__(self, a):
        self.a = a

    def __len__(self):
        return len(self.a)

    def get(self, idx):
        return self.a[idx]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_split()
    model = train_demo_model(x_train, y_train, epochs=8)
    calibrate_batch_average(model, batches(_Array(x_train), 32, 40, order="random", seed=0), 40,
                            progress=False)
    return model.eval(), x_test, y_test


def test_onnxruntime_agrees_on_every_test_prediction(trained):
    model, x_test, y_test = trained
    sn = export_sn_onnx(model, (1, 1, 8, 8), dynamic_batch=True)
    dec = decompose_model(sn)
    with torch.no_grad():
        pred_torch = model(torch.from_numpy(x_test)).argmax(1).numpy()
    assert (pred_torch == y_test).mean() > 0.95  # it really learned
    for form in (dec, sn):
        sess = create_session(form)
        pred = sess.run(None, {"input": x_test})[0].argmax(1)
        np.testing.assert_array_equal(pred, pred_torch)
    report = validate(model, [dec, sn], x_test, per_layer=True)
    assert report.passed
    assert all(c.argmax_agreement == 1.0 for f in report.forms for c in f.outputs)
