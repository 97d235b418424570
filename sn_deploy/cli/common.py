"""What every sn_deploy command shares: one-line errors, exit codes, shape options."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

import typer

from sn_deploy.errors import SnDeployError

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
            app(standalone_mode=True)
        except SnDeployError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return main
