"""``sn-decompose`` as users run it: happy path, and every bad input → one line, exit 2, no file."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest

from sn_deploy import onnx_ops
from sn_deploy.cli import decompose as cli
from sn_deploy.runtime.onnxruntime import create_session
from tests.test_decompose import ref, sn_model


def run_cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["sn-decompose", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


@pytest.fixture
def sn_file(tmp_path):
    model, p = sn_model((2, 3, 6, 6), dynamic=(0,))
    path = tmp_path / "model.sn.onnx"
    onnx.save(model, path)
    return path, p


def test_happy_path(sn_file, tmp_path, capsys, monkeypatch, rng):
    src, p = sn_file
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli([src, "-o", out], capsys, monkeypatch)
    assert code == 0, err
    assert f"wrote {out}" in stdout and err == ""
    dec = onnx.load(out)
    assert not any(n.domain == onnx_ops.DOMAIN for n in dec.graph.node)
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    y = create_session(out).run(None, {"X": x})[0]
    np.testing.assert_allclose(y, ref(x, p), rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.sn.onnx"]  # no temp files


def test_model_without_sn_nodes_is_written_with_a_note(sn_file, tmp_path, capsys, monkeypatch):
    src, _ = sn_file
    plain = tmp_path / "plain.onnx"
    code, *_ = run_cli([src, "-o", plain], capsys, monkeypatch)
    assert code == 0
    code, stdout, err = run_cli([plain, "-o", tmp_path / "again.onnx"], capsys, monkeypatch)
    assert code == 0 and "no SwitchableNorm node" in err
    assert (tmp_path / "again.onnx").is_file()


def _bad_inputs(tmp_path, sn_file):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07\xff\xfe garbage")
    (tmp_path / "text.onnx").write_text("hello, I am not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    degenerate, _ = sn_model((2, 3, 1, 1))
    onnx.save(degenerate, tmp_path / "one_pixel.sn.onnx")
    src, _ = sn_file
    out = tmp_path / "out.onnx"
    return [
        ([tmp_path / "missing.sn.onnx", "-o", out], "not found"),
        ([tmp_path / "garbage.onnx", "-o", out], "ONNX"),
        ([tmp_path / "text.onnx", "-o", out], "ONNX"),
        ([tmp_path / "empty.onnx", "-o", out], "not an ONNX model"),
        ([tmp_path / "adir", "-o", out], "is a directory"),
        ([tmp_path / "one_pixel.sn.onnx", "-o", out], "1 element per plane"),
        ([src, "-o", "/proc/forbidden/out.onnx"], "does not exist"),
        ([src, "-o", "/proc/out.onnx"], "not writable"),
        ([src, "-o", tmp_path / "adir"], "is a directory"),
    ]


@pytest.mark.parametrize("index", range(9))
def test_bad_inputs(index, sn_file, tmp_path, capsys, monkeypatch):
    args, pattern = _bad_inputs(tmp_path, sn_file)[index]
    before = set(os.listdir(tmp_path))
    code, _, err = run_cli(args, capsys, monkeypatch)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    assert set(os.listdir(tmp_path)) == before  # nothing written, no temp file left
