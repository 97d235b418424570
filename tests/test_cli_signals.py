"""SIGTERM ends a command with one line, exit 143 and its outputs undone, even when a library
below the command catches the exception the signal raised (torch.onnx's exporter does)."""
from __future__ import annotations

import os
import signal

import pytest
import typer

from sn_deploy.atomic import atomic_write
from sn_deploy.cli.common import EXIT_TERMINATED, run_app


def _app(out, behaviour: str) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    def job() -> None:
        atomic_write(out / "first.txt", "written before the signal")
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:  # a library that swallows everything
            if behaviour == "fails":
                raise RuntimeError("partially initialized module") from None
        atomic_write(out / "second.txt", "written after the signal")

    return app


@pytest.mark.parametrize("behaviour", ["fails", "finishes"])
def test_sigterm_swallowed_below_the_command_still_terminates(tmp_path, capsys, monkeypatch,
                                                               behaviour):
    monkeypatch.setattr("sys.argv", ["sn-job"])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_app(_app(tmp_path, behaviour))()
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_TERMINATED
    assert err == ["error: terminated (SIGTERM); outputs left as they were"]
    assert list(tmp_path.iterdir()) == []  # both files undone
