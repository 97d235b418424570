"""What every sn_deploy command shares: one-line errors, exit codes, shape options."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

import typer

from sn_deploy.errors import SnDeployError

if TYPE_CHECKING:
    import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` on one line and exit: no traceback reaches the user."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Entry point that turns SnDeployError (and Ctrl-C) into one line and exit code 2."""

    app.pretty_exceptions_enable = False  # a traceback is never the user's answer

    def main() -> None:
        try:
            code = app(standalone_mode=False)
        except SnDeployError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except (KeyboardInterrupt, typer.Abort):
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except typer.TyperException as exc:  # click's ClickException, vendored by typer
            # a bad option value, a missing argument, an unknown flag: one line, not click's box
            ctx = getattr(exc, "ctx", None)
            prog = ctx.command_path if ctx is not None else "the command"
            message = ' '.join(exc.format_message().split()).rstrip('.')
            print(f"error: {message}; see '{prog} --help'",
                  file=sys.stderr)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    return main


def device_option(spec: Optional[str], distributed: bool = False) -> "torch.device":
    """``--device``: resolved and checked before any slow work; under torchrun (``distributed``)
    a bare ``cuda`` is each rank's ``cuda:LOCAL_RANK``.  The library's message names its
    ``device`` parameter; here it names the flag."""
    from sn_deploy.device import DeviceError, resolve_device, torchrun_local_rank

    local = torchrun_local_rank() if distributed else (None, 1)
    try:
        return resolve_device(spec, *local)
    except DeviceError as exc:
        raise SnDeployError(f"--{exc}") from None
