"""``sn-serve``: serve ONNX models over the Open Inference Protocol (KServe v2 REST).

MODEL is one .onnx file (served as its file stem) or a Triton-layout repository
(REPO/name/<version>/model.onnx). Ctrl-C or SIGTERM finishes in-flight requests, then exits.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from sn_deploy.cli.common import fail, run_app

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="model.onnx or a model repository folder"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="1 disables batching"),
    max_queue_delay_ms: float = typer.Option(5.0, "--max-queue-delay-ms"),
    workers: int = typer.Option(1, "--workers", help="batches run concurrently per model"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads"),
    max_body_mb: float = typer.Option(256, "--max-body-mb", help="largest accepted request body"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="accept NaN/Inf inputs instead of answering 400"),
    quiet: bool = typer.Option(False, "--quiet", help="no per-request log lines"),
) -> None:
    from sn_deploy.serve.server import InferenceServer, ServeOptions

    if max_batch_size < 1 or workers < 1 or max_queue_delay_ms < 0 or max_body_mb <= 0:
        fail("--max-batch-size and --workers must be ≥ 1, --max-queue-delay-ms ≥ 0, "
             "--max-body-mb > 0")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    options = ServeOptions(host, port, max_batch_size, max_queue_delay_ms, workers, threads,
                           int(max_body_mb * (1 << 20)), not allow_nonfinite)
    try:
        server = InferenceServer(model, options)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port")
    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    names = ", ".join(f"{n} (v{m.version}, batching {'on' if m.batching else 'off'})"
                      for n, m in server.models.items())
    typer.echo(f"serving {names} on http://{host}:{server.port}", err=True)
    server.serve_forever()


main = run_app(app)
