"""SIGTERM and Ctrl-C end a command with one line, exit 143/130 and its outputs undone, even when
a library below the command catches the exception the signal raised (torch.onnx's exporter does)."""
from __future__ import annotations

import os
import signal

import pytest
import typer

from sn_deploy.atomic import atomic_write
from sn_deploy.cli.common import EXIT_INTERRUPTED, EXIT_TERMINATED, run_app


def _app(out, signum: int, behaviour: str) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    def job() -> None:
        atomic_write(out / "first.txt", "written before the signal")
        try:
            os.kill(os.getpid(), signum)
        except BaseException:  # a library that swallows everything
            if behaviour == "fails":
                raise RuntimeError("partially initialized module") from None
        atomic_write(out / "second.txt", "written after the signal")

    return app


EXPECTED = {signal.SIGTERM: (EXIT_TERMINATED, "error: terminated (SIGTERM); outputs left as they were"),
            signal.SIGINT: (EXIT_INTERRUPTED, "error: interrupted; outputs left as they were")}


@pytest.mark.parametrize("signum", list(EXPECTED))
@pytest.mark.parametrize("behaviour", ["fails", "finishes"])
def test_signal_swallowed_below_the_command_still_ends_it(tmp_path, capsys, monkeypatch, signum,
                                                          behaviour):
    monkeypatch.setattr("sys.argv", ["sn-job"])
    previous = {s: signal.getsignal(s) for s in EXPECTED}
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_app(_app(tmp_path, signum, behaviour))()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err.strip().splitlines()
    code, line = EXPECTED[signum]
    assert exit_info.value.code == code
    assert err == [line]
    assert list(tmp_path.iterdir()) == []  # both files undone
