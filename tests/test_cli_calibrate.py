"""``sn-calibrate`` as users run it: results equal the library's, recipes and flags, every bad input.

Every failure must be one ``error: ...`` line on stderr, exit 2, no traceback, and no output file
(not even a temp file) left behind.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from sn_deploy.calibrate import calibrate_batch_average
from sn_deploy.cli import calibrate as cli
from sn_deploy.data import ArraySource, batches
from sn_deploy.models import build_model
from tests.conftest import randomize_sn
from tests.test_cli import assert_one_line_error, run_cli

BIN = Path(sys.executable).parent


def plain_net() -> nn.Module:
    """A user architecture without SN layers (for the 'nothing to calibrate' error)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib_cli")
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    sd = model.state_dict()
    torch.save({"epoch": 7, "best_prec1": 91.5, "optimizer": {"state": {}},
                "state_dict": {"module." + k: v for k, v in sd.items()}}, d / "official.pth")
    torch.save(sd, d / "bare.pth")
    torch.save(model, d / "whole.pth")
    torch.save(plain_net().state_dict(), d / "plain.pth")
    (d / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    rng = np.random.default_rng(0)
    np.save(d / "data.npy", rng.normal(size=(48, 1, 8, 8)).astype(np.float32))
    nan = rng.normal(size=(48, 1, 8, 8)).astype(np.float32)
    nan[3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "rank3.npy", np.zeros((48, 8, 8), np.float32))
    (d / "small.yaml").write_text("batch_size: 6\nnum_batches: 3\npreprocess:\n  resize: 8\n"
                                  "  crop: 8\n  mean: [0.5]\n  std: [0.25]\n  channels: 1\n")
    (d / "typo.yaml").write_text("batchsize: 6\n")
    images = d / "images" / "class0"
    images.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)).save(images / f"{i}.png")
    (d / "empty").mkdir()
    return d


def _call(capsys, monkeypatch, *args):
    return run_cli(cli.main, [*map(str, args), "--quiet"], capsys, monkeypatch)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_result_equals_library_and_layout_is_kept(work, tmp_path, capsys, monkeypatch):
    out, rep = tmp_path / "cal.pth", tmp_path / "cal.json"
    code, stdout, err = _call(capsys, monkeypatch, work / "official.pth", "--arch", "demo_sn_net",
                              "--data", work / "data.npy", "--batch-size", "8", "--num-batches",
                              "5", "--order", "sequential", "--output", out, "--report", rep)
    assert code == 0, err
    assert "calibrated 4 layers on 5 batches of 8" in stdout
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"epoch", "best_prec1", "optimizer", "state_dict"}
    assert saved["epoch"] == 7 and saved["best_prec1"] == 91.5
    assert all(k.startswith("module.") for k in saved["state_dict"])

    expected = build_model("demo_sn_net", num_classes=10)
    expected.load_state_dict(torch.load(work / "bare.pth", weights_only=True))
    calibrate_batch_average(expected, batches(ArraySource(str(work / "data.npy")), 8, 5,
                                              order="sequential"), 5, progress=False)
    for k, v in expected.state_dict().items():
        assert torch.equal(saved["state_dict"]["module." + k], v), k

    report = json.loads(rep.read_text())
    assert report["num_batches"] == 5 and report["num_samples"] == 40
    layer = report["layers"][0]
    assert layer["name"] == "sn1" and layer["batches"] == 5
    assert set(layer["mean_weights"]) == {"in", "ln", "bn"} and layer["mean_abs_change_var"] > 0
    assert _leftovers(tmp_path) == ["cal.json", "cal.pth"]


def test_recipe_supplies_defaults_and_flags_override(work, tmp_path, capsys, monkeypatch):
    base = [work / "bare.pth", "--arch", "demo_sn_net", "--data", work / "data.npy",
            "--recipe", work / "small.yaml", "--order", "random", "--seed", "3"]
    code, stdout, err = _call(capsys, monkeypatch, *base, "--output", tmp_path / "a.pth")
    assert code == 0 and "on 3 batches of 6" in stdout, err
    code, stdout, err = _call(capsys, monkeypatch, *base, "--num-batches", "4",
                              "--output", tmp_path / "b.pth")
    assert code == 0 and "on 4 batches of 6" in stdout, err
    code, stdout, err = _call(capsys, monkeypatch, *base, "--output", tmp_path / "c.pth")
    a, c = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pth", "c.pth"))
    assert all(torch.equal(a[k], c[k]) for k in a)  # same seed, same result
    assert isinstance(a, dict) and "state_dict" not in a  # bare in, bare out


def test_image_folder_with_recipe(work, tmp_path, capsys, monkeypatch):
    code, stdout, err = _call(capsys, monkeypatch, work / "bare.pth", "--arch", "demo_sn_net",
                              "--data", work / "images", "--recipe", work / "small.yaml",
                              "--batch-size", "4", "--num-batches", "2",
                              "--output", tmp_path / "img.pth")
    assert code == 0, err
    assert "on 2 batches of 4" in stdout


def test_trust_pickle_keeps_a_pickled_module(work, tmp_path, capsys, monkeypatch):
    code, _, err = _call(capsys, monkeypatch, work / "whole.pth", "--arch", "demo_sn_net",
                         "--data", work / "data.npy", "--batch-size", "8", "--num-batches", "2",
                         "--trust-pickle", "--output", tmp_path / "w.pth")
    assert code == 0, err
    assert isinstance(torch.load(tmp_path / "w.pth", weights_only=False), nn.Module)


BAD_INPUTS = [
    ({"ckpt": "missing.pth"}, "not found"),
    ({"ckpt": "garbage.pth"}, "not a readable PyTorch checkpoint"),
    ({"ckpt": "whole.pth"}, "--trust-pickle"),
    ({"--arch": "resnetv1sn18"}, "does not match --arch resnetv1sn18"),
    ({"--arch": "resnet9000"}, "unknown --arch 'resnet9000'"),
    ({"ckpt": "plain.pth", "--arch": "tests.test_cli_calibrate:plain_net"}, "nothing to calibrate"),
    ({"--data": "missing.npy"}, "not found"),
    ({"--data": "empty"}, "no images"),
    ({"--data": "nan.npy", "--order": "sequential"}, "batch 0 holds NaN"),
    ({"--data": "rank3.npy"}, "rejects calibration batch 0 of shape (8, 8, 8)"),
    ({"--batch-size": "1"}, "at least 2"),
    ({"--num-batches": "7"}, "needs 8 x 7 = 56 samples but the data has 48"),
    ({"--order": "shuffled"}, "unknown --order"),
    ({"--recipe": "typo.yaml"}, "unknown field(s) batchsize"),
    ({"--recipe": "missing.yaml"}, "not found"),
    ({"--output": "/proc/forbidden/out.pth"}, "not writable"),
    ({"--report": "/proc/forbidden/r.json"}, "not writable"),
]


@pytest.mark.parametrize("change,pattern", BAD_INPUTS, ids=[p for _, p in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(change, pattern, work, tmp_path, capsys,
                                                  monkeypatch):
    opts = {"ckpt": "official.pth", "--arch": "demo_sn_net", "--data": "data.npy",
            "--batch-size": "8", "--num-batches": "4", "--output": str(tmp_path / "out.pth"),
            "--report": str(tmp_path / "out.json")}
    opts.update(change)
    for key in ("ckpt", "--data", "--recipe"):
        if key in opts and not opts[key].startswith("/"):
            opts[key] = str(work / opts[key])
    argv = [opts.pop("ckpt")] + [x for kv in opts.items() for x in kv]
    code, _, err = _call(capsys, monkeypatch, *argv)
    assert_one_line_error(code, err, pattern)
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not (BIN / "sn-calibrate").exists(), reason="console script not installed")
def test_console_script_failure_has_no_traceback(work, tmp_path):
    """The installed entry point in a real process (the happy path runs in-process above)."""
    proc = subprocess.run([str(BIN / "sn-calibrate"), str(work / "official.pth"), "--arch",
                           "demo_sn_net", "--data", str(work / "data.npy"), "--batch-size", "8",
                           "--num-batches", "99", "--output", str(tmp_path / "o.pth")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibration needs 8 x 99"), proc.stderr
    assert _leftovers(tmp_path) == []
