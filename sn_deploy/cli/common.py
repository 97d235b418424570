"""What every sn_deploy command shares: one-line errors, exit codes, shape options.

Each command runs as one transaction (:func:`sn_deploy.atomic.transaction`): when it fails
(exit 2, Ctrl-C, SIGTERM, a full disk) the files it wrote are removed and the files it replaced
get their old contents back. Exit 0 and 1 (a finished check that failed, e.g. parity) keep them.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

import typer

from sn_deploy.errors import SnDeployError

if TYPE_CHECKING:
    import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 130, 143, 141
_KEEP_FILES = (EXIT_OK, EXIT_FAILED, EXIT_BROKEN_PIPE)

# OSErrors that are the environment's doing (a file, a disk, a limit), not a bug
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                       errno.EPERM, errno.EIO, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                       errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.ELOOP, errno.EXDEV}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the running job cleans up like on Ctrl-C."""


class _Exit(Exception):
    def __init__(self, code: int):
        self.code = code


_signals_received: list[int] = []  # SIGINT/SIGTERM seen by the running command, in order
_RAISED_BY = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


def _raise_for_signal(signum, frame) -> NoReturn:
    # recorded as well as raised: a library may catch the exception (torch.onnx's exporter
    # catches BaseException while it tries its capture strategies) and fail or even finish
    _signals_received.append(signum)
    raise _RAISED_BY[signum]()


def _environment_error(exc: OSError) -> str:
    where = f" '{exc.filename}'" if exc.filename else ""
    return f"cannot access{where} ({exc.strerror or exc}); check the path, its permissions and " \
           "the free disk space"


def _quiet_stdout() -> int:
    """The reader of stdout went away (``| head``): stop writing, keep the results."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` on one line and exit: no traceback reaches the user."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Entry point that turns SnDeployError (and Ctrl-C) into one line and exit code 2."""

    app.pretty_exceptions_enable = False  # a traceback is never the user's answer

    def main() -> None:
        from sn_deploy.atomic import transaction

        if threading.current_thread() is threading.main_thread():
            for signum in _RAISED_BY:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup, background jobs
                    signal.signal(signum, _raise_for_signal)
        _signals_received.clear()
        try:
            with transaction():
                try:
                    code = app(standalone_mode=False)
                except BrokenPipeError:
                    code = _quiet_stdout()
                except BaseException:
                    if _signals_received:  # whatever it became on the way up
                        raise _RAISED_BY[_signals_received[0]]() from None
                    raise
                if _signals_received:  # swallowed below us: still undo, exit 130/143
                    raise _RAISED_BY[_signals_received[0]]()
                code = code if isinstance(code, int) else EXIT_OK
                if code not in _KEEP_FILES:
                    raise _Exit(code)  # undo what the command wrote
        except _Exit as exc:
            sys.exit(exc.code)
        except SnDeployError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except (KeyboardInterrupt, typer.Abort):
            print("error: interrupted; outputs left as they were", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            print("error: terminated (SIGTERM); outputs left as they were", file=sys.stderr)
            sys.exit(EXIT_TERMINATED)
        except MemoryError:
            print("error: out of memory; use smaller inputs or batches, or a machine with more "
                  "memory", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            print(f"error: {_environment_error(exc)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except typer.TyperException as exc:  # click's ClickException, vendored by typer
            # a bad option value, a missing argument, an unknown flag: one line, not click's box
            ctx = getattr(exc, "ctx", None)
            prog = ctx.command_path if ctx is not None else "the command"
            message = ' '.join(exc.format_message().split()).rstrip('.')
            print(f"error: {message}; see '{prog} --help'",
                  file=sys.stderr)
            sys.exit(exc.exit_code)
        sys.exit(code)

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
