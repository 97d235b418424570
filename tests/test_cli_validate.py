"""``sn-validate`` as users run it, in real processes: exit 0 on pass, 1 on a parity failure,
2 with a one-line error (no traceback) on bad input.

The processes are started together in one fixture and run concurrently: most of each one's time
is importing torch, and the cases do not depend on each other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.decompose import decompose_model
from tests.conftest import randomize_sn

SCRIPT = Path(sys.executable).parent / "sn-validate"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else \
    [sys.executable, "-c", "from sn_deploy.cli.validate import main; main()"]


def _files(d: Path) -> dict[str, Path]:
    model = randomize_sn(build_model("demo_sn_net", num_classes=10), seed=2)
    torch.save({"state_dict": model.state_dict()}, d / "ckpt.pth")
    sn = export_sn_onnx(model, (2, 1, 8, 8), dynamic_batch=True)
    onnx.save(sn, d / "model.sn.onnx")
    onnx.save(decompose_model(sn), d / "model.onnx")
    for node in sn.graph.node:           # a wrong epsilon in the middle layer
        if node.name == "sn2":
            next(a for a in node.attribute if a.name == "epsilon").f = 1.0
    onnx.save(sn, d / "bad.sn.onnx")
    dyn = onnx.load(d / "model.onnx")    # an input with dynamic spatial axes
    for dim, name in zip(dyn.graph.input[0].type.tensor_type.shape.dim[2:], ("h", "w")):
        dim.dim_param = name
    onnx.save(dyn, d / "dyn.onnx")
    rng = np.random.default_rng(0)
    np.save(d / "good.npy", rng.standard_normal((5, 1, 8, 8)).astype(np.float32))
    np.save(d / "wrong.npy", rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    return {p.name: p for p in d.iterdir()}


def _cases(d: Path) -> dict[str, list[str]]:
    base = [str(d / "ckpt.pth"), "--arch", "demo_sn_net"]
    good = ["--onnx", str(d / "model.onnx"), "--onnx", str(d / "model.sn.onnx")]
    return {
        "pass": base + good + ["--per-layer", "--inputs", str(d / "good.npy"), "--batch", "4",
                               "--json", str(d / "out" / "r.json"),
                               "--html", str(d / "out" / "r.html")],
        "pass_random": base + ["--onnx", str(d / "model.onnx"), "--batch", "3", "--seed", "7"],
        "corrupt": base + ["--onnx", str(d / "bad.sn.onnx"), "--per-layer",
                           "--json", str(d / "bad.json")],
        "missing_checkpoint": [str(d / "missing.pth"), "--arch", "demo_sn_net"] + good,
        "wrong_arch": [str(d / "ckpt.pth"), "--arch", "resnetv1sn18"] + good,
        "bad_npy_shape": base + good + ["--inputs", str(d / "wrong.npy")],
        "bad_input_shape": base + good + ["--input-shape", "1x1xeight"],
        "unfit_input_shape": base + good + ["--input-shape", "1x3x8x8"],
        "dynamic_spatial": base + ["--onnx", str(d / "dyn.onnx")],
        "unwritable_json": base + good + ["--json", "/proc/forbidden/r.json"],
        "usage": [str(d / "ckpt.pth"), "--arhc", "demo_sn_net", "--onnx", str(d / "model.onnx")],
        "inferred_arch": [str(d / "ckpt.pth"), "--onnx", str(d / "model.onnx")],   # no --arch
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sn_validate")
    _files(d)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {name: subprocess.Popen(COMMAND + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
             for name, args in _cases(d).items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return d, results


def test_pass_exits_0_and_writes_both_reports(runs):
    d, results = runs
    code, out, err = results["pass"]
    assert code == 0, out + err
    assert "PASSED" in out and "first divergent layer: none" in out and "Traceback" not in err
    data = json.loads((d / "out" / "r.json").read_text())
    assert data["passed"] and data["input_shape"] == [4, 1, 8, 8]   # first --batch samples
    assert [f["name"] for f in data["forms"]] == ["model.onnx", "model.sn.onnx"]
    assert [c["name"] for c in data["forms"][1]["layers"]] == ["sn1", "sn2", "sn3", "sn4"]
    page = (d / "out" / "r.html").read_text()
    assert "<svg" in page and "sn3" in page
    assert sorted(p.name for p in (d / "out").iterdir()) == ["r.html", "r.json"]

    code, out, err = results["pass_random"]
    assert code == 0 and "input 3x1x8x8" in out, out + err


def test_corrupted_model_exits_1_and_names_the_layer(runs):
    d, results = runs
    code, out, err = results["corrupt"]
    assert code == 1, out + err
    assert "FAILED" in out and "first divergent layer: sn2" in out and "Traceback" not in err
    data = json.loads((d / "bad.json").read_text())
    assert not data["passed"] and data["forms"][0]["first_divergent_layer"] == "sn2"


@pytest.mark.parametrize("case,pattern", [
    ("missing_checkpoint", "not found"),
    ("wrong_arch", "does not match --arch resnetv1sn18"),
    ("bad_npy_shape", "has shape (4, 3, 8, 8), but the model takes Nx1x8x8"),
    ("bad_input_shape", "invalid shape '1x1xeight'"),
    ("unfit_input_shape", "--input-shape 1x3x8x8 does not fit"),
    ("dynamic_spatial", "pass --input-shape"),
    ("unwritable_json", "--json '/proc/forbidden/r.json'"),
])
def test_bad_input_exits_2_with_one_line(runs, case, pattern):
    _, results = runs
    code, out, err = results[case]
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0] and "Traceback" not in err


def test_usage_error_exits_2(runs):
    _, results = runs
    code, out, err = results["usage"]
    assert code == 2 and "--arhc" in err and "Traceback" not in err


def test_arch_inferred_from_the_checkpoint(runs):
    code, out, err = runs[1]["inferred_arch"]
    assert code == 0, err
    assert "arch: demo_sn_net, inferred from the keys and shapes of 'ckpt.pth'" in out
