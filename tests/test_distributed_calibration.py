"""Distributed batch-average calibration (torchrun, gloo) equals the single-process result."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sn_deploy.models import build_model
from tests.conftest import randomize_sn

BIN = Path(sys.executable).parent
needs_torchrun = pytest.mark.skipif(not (BIN / "torchrun").exists() or not (BIN / "sn-calibrate").exists(),
                                    reason="torchrun / sn-calibrate not installed in this environment")


def _run(cmd, tmp_path):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@needs_torchrun
def test_two_ranks_equal_one_process(tmp_path):
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "in.pth")
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(i, 1 + i, size=(8, 1, 8, 8)) for i in range(7)])
    np.save(tmp_path / "d.npy", data.astype(np.float32))
    args = ["--arch", "demo_sn_net", "--data", tmp_path / "d.npy", "--batch-size", "8",
            "--num-batches", "7", "--order", "sequential", "--quiet"]
    _run([BIN / "sn-calibrate", tmp_path / "in.pth", *args, "--output", tmp_path / "single.pth"],
         tmp_path)
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _run([BIN / "torchrun", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                 f"--master_port={port}", BIN / "sn-calibrate",
                 tmp_path / "in.pth", *args, "--output", tmp_path / "dist.pth", "--distributed"],
                tmp_path)
    assert "over 2 processes" in proc.stdout
    single = torch.load(tmp_path / "single.pth", weights_only=True)["state_dict"]
    dist = torch.load(tmp_path / "dist.pth", weights_only=True)["state_dict"]
    changed = [k for k in single if "running" in k]
    assert changed
    for k in single:
        torch.testing.assert_close(dist[k], single[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(single[k], model.state_dict()[k]) for k in changed)


def test_distributed_without_torchrun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from sn_deploy.cli import calibrate as cli
    from tests.test_cli import assert_one_line_error, run_cli

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code, _, err = run_cli(cli.main, [tmp_path / "x.pth", "--arch", "demo_sn_net", "--data", "d.npy",
                                      "--output", tmp_path / "o.pth", "--distributed"],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, "needs a torchrun launch")
