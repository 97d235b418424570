"""Calibration at scale: a killed run resumes to the same statistics, image folders load in
DataLoader workers, the report gives throughput, and a failing rank stops every rank."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sn_deploy.calibrate import calibrate_from_data
from sn_deploy.models import build_model
from tests.conftest import randomize_sn

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def slow_demo_net(**kw) -> torch.nn.Module:
    """demo_sn_net taking 0.2 s a batch, so a test can kill a run half way."""
    model = build_model("demo_sn_net", **kw)
    model.register_forward_pre_hook(lambda *_: time.sleep(0.2))
    return model


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save({"epoch": 3, "best_prec1": 0.0, "optimizer": {},
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               d / "in.pth")
    rng = np.random.default_rng(0)
    np.save(d / "data.npy", (rng.normal(size=(64, 1, 8, 8)) * 3 + 1).astype(np.float32))
    return d


def _cmd(d: Path, out: str, *extra) -> list[str]:
    return [str(BIN / "sn-calibrate"), str(d / "in.pth"), "--arch",
            "tests.test_calibrate_resume:slow_demo_net", "--data", str(d / "data.npy"),
            "--batch-size", "4", "--num-batches", "14", "--order", "random", "--seed", "5",
            "--quiet", "--output", str(d / out), *extra]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, **kw)


def _saved_batches(state: Path) -> int:
    try:
        return int(torch.load(state, weights_only=True)["done"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def _kill_after_saves(cmd: list[str], state: Path, batches: int) -> int:
    """Start ``cmd``, SIGKILL it once its state file records ``batches``; returns the count."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _saved_batches(state) < batches and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return _saved_batches(state)


def test_killed_run_resumes_to_the_same_statistics(job):
    full = _run(_cmd(job, "full.pth"))
    assert full.returncode == 0, full.stderr
    out, state = job / "resumed.pth", job / "resumed.pth.calib-state"
    killed_at = _kill_after_saves(_cmd(job, "resumed.pth", "--checkpoint-every", "2"), state, 4)
    assert 4 <= killed_at < 14, f"the run was not killed half way ({killed_at})"
    assert not out.exists()
    resumed = _run(_cmd(job, "resumed.pth", "--checkpoint-every", "2", "--report",
                        str(job / "resumed.json")))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after {killed_at} batch(es)" in resumed.stdout
    assert not state.exists()  # a finished run leaves no state behind
    a = torch.load(job / "full.pth", weights_only=True)["state_dict"]
    b = torch.load(out, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:  # float64 sums restored and added in the same order: bit for bit
        assert torch.equal(a[k], b[k]), k
    report = json.loads((job / "resumed.json").read_text())
    assert report["resumed_from_batch"] == killed_at and report["num_batches"] == 14
    assert report["num_samples"] == 56 and report["images_per_second"] > 0


def test_state_of_another_run_is_refused(job):
    state = job / "other.pth.calib-state"
    assert _kill_after_saves(_cmd(job, "other.pth", "--checkpoint-every", "1"), state, 1) >= 1
    cmd = _cmd(job, "other.pth", "--checkpoint-every", "1")
    cmd[cmd.index("--seed") + 1] = "6"
    res = _run(cmd)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: calibration state '{state}' belongs to another run (different seed); "
        "rerun with the same settings or delete it"]
    state.write_bytes(b"garbage")
    res = _run(_cmd(job, "other.pth", "--checkpoint-every", "1"))
    assert res.returncode == 2 and "is unreadable" in res.stderr and "Traceback" not in res.stderr
    assert not (job / "other.pth").exists()


def _image_folder(root: Path, n: int, bad: int | None = None) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        sub = root / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        if i == bad:
            (sub / f"img{i}.png").write_bytes(b"not a png")
            continue
        Image.fromarray(rng.integers(0, 255, (12 + i % 5, 10 + i % 4), np.uint8)).save(
            sub / f"img{i}.png")
    return root


def _recipe(d: Path) -> Path:
    p = d / "gray.yaml"
    p.write_text("preprocess: {resize: 8, crop: 8, mean: [0.5], std: [0.25], channels: 1}\n")
    return p


def test_image_folder_workers_give_the_same_statistics(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 24)
    states = []
    base = randomize_sn(build_model("demo_sn_net", num_classes=10))
    for workers in (0, 2):
        model = copy.deepcopy(base)
        result = calibrate_from_data(model, str(folder), recipe=str(_recipe(tmp_path)),
                                     batch_size=4, num_batches=6, order="random", seed=1,
                                     progress=False, workers=workers)
        assert result.num_samples == 24 and result.images_per_second > 0
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert any(not torch.equal(states[0][k], v) for k, v in base.state_dict().items())


def test_unreadable_image_in_a_worker_is_one_line(job, tmp_path):
    folder = _image_folder(tmp_path / "imgs", 16, bad=9)
    res = _run([str(BIN / "sn-calibrate"), str(job / "in.pth"), "--arch", "demo_sn_net",
                "--data", str(folder), "--recipe", str(_recipe(tmp_path)), "--batch-size", "4",
                "--num-batches", "4", "--order", "sequential", "--workers", "2",
                "--output", str(tmp_path / "o.pth")])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: cannot read image") and "img9.png" in lines[0]
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed")
def test_a_failing_rank_stops_every_rank(job, tmp_path):
    data = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    data[5] = np.nan  # batch 1 (sequential, B=4): rank 1's first batch
    np.save(tmp_path / "nan.npy", data)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = _run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={port}", str(BIN / "sn-calibrate"), str(job / "in.pth"),
                "--arch", "demo_sn_net", "--data", str(tmp_path / "nan.npy"), "--batch-size", "4",
                "--num-batches", "4", "--order", "sequential", "--quiet", "--distributed",
                "--output", str(tmp_path / "o.pth")], cwd=tmp_path)
    assert res.returncode != 0
    assert "error: calibration batch 1 holds NaN" in res.stderr
    assert "error: 1 other rank(s) failed" in res.stderr
    assert not (tmp_path / "o.pth").exists()
