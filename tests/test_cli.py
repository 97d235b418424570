"""The commands as users run them: happy paths, and every bad input → one line, exit 2, no files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sn_deploy.cli import calibrate as cli_calibrate
from sn_deploy.cli import decompose as cli_decompose
from sn_deploy.cli import export as cli_export
from sn_deploy.cli import validate as cli_validate
from sn_deploy.models import build_model
from tests.conftest import randomize_sn

BIN = Path(sys.executable).parent


def run_cli(main, args, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save({"epoch": 1, "best_prec1": 0.0, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               d / "ckpt.pth")
    np.save(d / "data.npy", np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32))
    return d


def test_calibrate_happy_path(workdir, capsys, monkeypatch):
    out = workdir / "cal.pth"
    code, stdout, err = run_cli(cli_calibrate.main, [
        workdir / "ckpt.pth", "--arch", "demo_sn_net", "--data", workdir / "data.npy",
        "--batch-size", "8", "--num-batches", "4", "--order", "sequential",
        "--output", out, "--report", workdir / "cal.json", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"epoch", "best_prec1", "optimizer", "state_dict"}
    report = json.loads((workdir / "cal.json").read_text())
    assert [l["name"] for l in report["layers"]] == ["sn1", "sn2", "sn3", "sn4"]


def test_export_happy_path_and_validate(workdir, capsys, monkeypatch):
    out = workdir / "export"
    code, stdout, err = run_cli(cli_export.main, [
        workdir / "ckpt.pth", "--arch", "demo_sn_net", "--input-shape", "2x1x8x8",
        "--dynamic-batch", "--output-dir", out], capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.sn.onnx", "report.html",
                                                    "report.json"]
    assert "PASSED" in stdout
    code, stdout, err = run_cli(cli_validate.main, [
        workdir / "ckpt.pth", "--arch", "demo_sn_net", "--onnx", out / "model.onnx",
        "--onnx", out / "model.sn.onnx", "--per-layer", "--batch", "3"], capsys, monkeypatch)
    assert code == 0, err
    assert "first divergent layer: none" in stdout
    code, stdout, err = run_cli(cli_decompose.main, [out / "model.sn.onnx", "-o",
                                                     workdir / "dec.onnx"], capsys, monkeypatch)
    assert code == 0 and (workdir / "dec.onnx").is_file()


@pytest.mark.parametrize("flags,fused", [([], 8), (["--no-fuse-residual"], 0)],
                         ids=["default", "no-fuse-residual"])
def test_export_resnet_residual_fusion_flag(tmp_path, capsys, monkeypatch, flags, fused):
    """ResNet blocks: residual Adds folded by default (and validated per layer), kept on request;
    the per-layer check of sn-validate passes on the fused files too."""
    import onnx

    from sn_deploy.passes.fuse import fused_residual_layers

    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "out"
    code, stdout, err = run_cli(cli_export.main, [
        tmp_path / "r18.pth", "--arch", "resnetv1sn18", "--input-shape", "1x3x64x64",
        "--output-dir", out, *flags], capsys, monkeypatch)
    assert code == 0, err
    assert "PASSED" in stdout and "first divergent layer: none" in stdout
    sn = onnx.load(out / "model.sn.onnx")
    assert len(fused_residual_layers(sn)) == fused
    assert [n.op_type for n in sn.graph.node].count("Add") == 8 - fused
    assert fused_residual_layers(onnx.load(out / "model.onnx")) == fused_residual_layers(sn)
    code, stdout, err = run_cli(cli_validate.main, [
        tmp_path / "r18.pth", "--arch", "resnetv1sn18", "--onnx", out / "model.sn.onnx",
        "--onnx", out / "model.onnx", "--per-layer", "--seed", "3"], capsys, monkeypatch)
    assert code == 0 and "first divergent layer: none" in stdout, stdout + err


def test_validate_exit_1_on_parity_failure(workdir, capsys, monkeypatch):
    import onnx

    src = workdir / "export" / "model.sn.onnx"
    if not src.exists():
        pytest.skip("needs the export test")
    model = onnx.load(src)
    for node in model.graph.node:
        if node.name == "sn2":
            for a in node.attribute:
                if a.name == "epsilon":
                    a.f = 1.0
    onnx.save(model, workdir / "bad.sn.onnx")
    code, stdout, err = run_cli(cli_validate.main, [
        workdir / "ckpt.pth", "--arch", "demo_sn_net", "--onnx", workdir / "bad.sn.onnx",
        "--per-layer"], capsys, monkeypatch)
    assert code == 1
    assert "first divergent layer: sn2" in stdout and "FAILED" in stdout


EXPORT_ERRORS = [
    (["missing.pth"], "not found"),
    (["garbage.pth"], "not a readable PyTorch checkpoint"),
    (["notckpt.pth"], "no state_dict found"),
    (["ckpt.pth", "--arch", "resnetv1sn18"], "does not match --arch resnetv1sn18"),
    (["ckpt.pth", "--arch", "nosuch"], "unknown --arch"),
    (["ckpt.pth", "--input-shape", "1x1xeight"], "invalid shape"),
    (["ckpt.pth", "--input-shape", "1x3x8x8"], "does not accept input shape"),
    (["ckpt.pth", "--input-shape", "1x1x1x1"], "one spatial element per plane"),
    (["ckpt.pth", "--output-dir", "/proc/forbidden"], "not writable"),
    (["ckpt.pth", "--calibrate-data", "data.npy", "--calibrate-num-batches", "100"],
     "calibration needs 32 x 100 = 3200 samples but the data has 64"),
]


@pytest.mark.parametrize("args,pattern", EXPORT_ERRORS)
def test_export_bad_inputs(args, pattern, workdir, capsys, monkeypatch, tmp_path):
    (workdir / "garbage.pth").write_bytes(b"\x00garbage")
    torch.save({"epoch": 3}, workdir / "notckpt.pth")
    opts = {"--arch": "demo_sn_net", "--input-shape": "1x1x8x8", "--output-dir": str(tmp_path / "o")}
    rest = args[1:]
    for i in range(0, len(rest), 2):
        opts[rest[i]] = rest[i + 1]
    if "--calibrate-data" in opts:
        opts["--calibrate-data"] = str(workdir / opts["--calibrate-data"])
    argv = [workdir / args[0]] + [x for kv in opts.items() for x in kv]
    code, _, err = run_cli(cli_export.main, argv, capsys, monkeypatch)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "o").exists()  # not even the empty folder it created


def test_degenerate_shape_refused_at_export(tmp_path, capsys, monkeypatch):
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    torch.save(model.state_dict(), tmp_path / "r.pth")
    code, _, err = run_cli(cli_export.main, [tmp_path / "r.pth", "--arch", "resnetv1sn18",
                                             "--input-shape", "1x3x32x32", "--output-dir",
                                             tmp_path / "o"], capsys, monkeypatch)
    assert_one_line_error(code, err, "SN layer 'layer4.0.sn1' sees input (1, 512, 1, 1)")
    assert not (tmp_path / "o").exists()  # the folder this run created is removed again


CALIBRATE_ERRORS = [
    (["--data", "missing.npy"], "not found"),
    (["--data", "bad.npy"], "expected a numeric array"),
    (["--data", "wrongch.npy"], "rejects calibration batch 0"),
    (["--batch-size", "1"], "at least 2"),
    (["--num-batches", "9"], "needs 8 x 9 = 72 samples but the data has 64"),
    (["--recipe", "missing.yaml"], "recipe"),
    (["--output", "/proc/nope/out.pth"], "not writable"),
]


@pytest.mark.parametrize("args,pattern", CALIBRATE_ERRORS)
def test_calibrate_bad_inputs(args, pattern, workdir, capsys, monkeypatch, tmp_path):
    np.save(workdir / "bad.npy", np.zeros(5))
    np.save(workdir / "wrongch.npy", np.zeros((64, 3, 8, 8), np.float32))
    opts = {"--arch": "demo_sn_net", "--data": "data.npy", "--batch-size": "8",
            "--num-batches": "4", "--output": str(tmp_path / "out.pth")}
    for i in range(0, len(args), 2):
        opts[args[i]] = args[i + 1]
    for key in ("--data", "--recipe"):
        if key in opts:
            opts[key] = str(workdir / opts[key])
    argv = [workdir / "ckpt.pth", "--quiet"] + [x for kv in opts.items() for x in kv]
    code, _, err = run_cli(cli_calibrate.main, argv, capsys, monkeypatch)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "out.pth").exists()
    assert not list(tmp_path.glob(".*.tmp"))


VALIDATE_ERRORS = [
    (["--onnx", "missing.onnx"], "not found"),
    (["--onnx", "ckpt.pth"], "not a readable ONNX model"),
    (["--inputs", "wrong.npy"], "has shape"),
]


@pytest.mark.parametrize("args,pattern", VALIDATE_ERRORS)
def test_validate_bad_inputs(args, pattern, workdir, capsys, monkeypatch):
    np.save(workdir / "wrong.npy", np.zeros((4, 3, 8, 8), np.float32))
    onnx_path = workdir / "export" / "model.onnx"
    if not onnx_path.exists():
        pytest.skip("needs the export test")
    opts = {"--arch": "demo_sn_net", "--onnx": str(onnx_path)}
    for i in range(0, len(args), 2):
        opts[args[i]] = str(workdir / args[i + 1])
    code, _, err = run_cli(cli_validate.main, [workdir / "ckpt.pth"] +
                           [x for kv in opts.items() for x in kv], capsys, monkeypatch)
    assert_one_line_error(code, err, pattern)


@pytest.mark.skipif(not (BIN / "sn-export").exists(), reason="console scripts not installed")
def test_console_script_error_has_no_traceback(tmp_path):
    """The installed entry point, in a real process."""
    proc = subprocess.run([str(BIN / "sn-export"), str(tmp_path / "none.pth"), "--arch",
                           "demo_sn_net", "--input-shape", "1x1x8x8", "--output-dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: checkpoint") and "Traceback" not in proc.stderr


COMMANDS = ["sn-calibrate", "sn-export", "sn-decompose", "sn-specialize", "sn-validate",
            "sn-build-engine", "sn-serve"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("args,pattern", [
    ([], "Missing argument"),
    (["x.pth", "--no-such-flag"], "No such option: --no-such-flag"),
])
def test_usage_errors_are_one_line(command, args, pattern):
    exe = Path(sys.executable).parent / command
    if not exe.exists():
        pytest.skip(f"{command} not installed in this environment")
    if command == "sn-serve" and not args:
        args, pattern = ["m.onnx", "--port", "not-a-port"], "Invalid value for '--port'"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]
    assert lines[0].endswith(f"see '{command} --help'") and "Traceback" not in proc.stderr


def test_help_still_exits_0():
    exe = Path(sys.executable).parent / "sn-calibrate"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint-every" in proc.stdout
