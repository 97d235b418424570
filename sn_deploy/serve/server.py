"""``sn-serve``: ONNX Runtime behind the Open Inference Protocol (KServe v2 REST).

One threaded HTTP server; per model a :class:`ServedModel` with its dynamic batcher. Models come
from one ``.onnx`` file or a Triton-layout repository (``REPO/name/<version>/model.onnx``), so a
repository moves between sn-serve and Triton unchanged. Prometheus metrics at ``/metrics``, one
JSON log line per request, graceful shutdown that lets in-flight requests finish.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from sn_deploy import __version__
from sn_deploy.errors import InputError
from sn_deploy.serve.model import BatchStats, ModelError, ServedModel
from sn_deploy.serve.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response

log = logging.getLogger("sn_deploy.serve")
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config)?$")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    workers: int = 1
    threads: Optional[int] = None
    max_body_bytes: int = 256 << 20
    reject_nonfinite: bool = True


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sn_requests", "inference requests", ["model"], registry=self.registry)
        self.failures = Counter("sn_request_failures", "failed inference requests", ["model", "code"],
                                registry=self.registry)
        self.queue = Histogram("sn_queue_seconds", "time from arrival to batch start", ["model"],
                               registry=self.registry)
        self.infer = Histogram("sn_inference_seconds", "onnxruntime time per batch", ["model"],
                               registry=self.registry)
        self.batch = Histogram("sn_batch_size", "samples per executed batch", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

    def on_batch(self, model: str, stats: BatchStats) -> None:
        for q in stats.queue_seconds:
            self.queue.labels(model).observe(q)
        self.infer.labels(model).observe(stats.infer_seconds)
        self.batch.labels(model).observe(stats.size)


def discover(path: Path) -> dict[str, tuple[str, Path]]:
    """name → (version, model file) for a single file or a Triton-layout repository."""
    if path.is_file():
        return {path.stem.split(".")[0] or "model": ("1", path)}
    if not path.is_dir():
        raise InputError(f"'{path}' is neither an .onnx file nor a model repository folder")
    found = {}
    for model_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        versions = sorted((v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()
                           and (v / "model.onnx").is_file()), key=lambda v: int(v.name))
        if versions:
            found[model_dir.name] = (versions[-1].name, versions[-1] / "model.onnx")
    if not found:
        raise InputError(f"no models in '{path}': expected NAME/<version>/model.onnx (Triton layout)")
    return found


class InferenceServer:
    """The models, the metrics and the HTTP server; ``serve_forever`` / ``shutdown``."""

    def __init__(self, path: Path, options: ServeOptions):
        self.options = options
        self.metrics = Metrics()
        self.models: dict[str, ServedModel] = {}
        for name, (version, file) in discover(Path(path)).items():
            self.models[name] = ServedModel(
                name, version, file, options.max_batch_size, options.max_queue_delay_ms / 1e3,
                options.workers, options.threads, options.reject_nonfinite, self.metrics.on_batch)
        for m in self.models.values():
            m.warm_up()
        self._inflight = 0
        self._lock = threading.Condition()
        self.httpd = ThreadingHTTPServer((options.host, options.port), _handler(self))
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish, stop the batchers."""
        self.httpd.shutdown()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight and time.monotonic() < deadline:
                self._lock.wait(0.1)
        self.httpd.server_close()
        for m in self.models.values():
            m.close()

    def track(self, delta: int) -> None:
        with self._lock:
            self._inflight += delta
            self._lock.notify_all()


def _handler(server: InferenceServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"sn-serve/{__version__}"

        def log_message(self, *args) -> None:  # replaced by one JSON line per request
            pass

        def setup(self) -> None:
            super().setup()
            # answer in one segment now: with Nagle + the client's delayed ACK a keep-alive
            # response would stall ~40 ms behind its own headers
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _send(self, status: int, body: bytes, content_type: str = "application/json",
                  header_length: Optional[int] = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if header_length is not None:
                self.send_header(HEADER_LENGTH, str(header_length))
            self._headers_buffer.append(b"\r\n")  # end_headers without its flush:
            self.wfile.write(b"".join(self._headers_buffer) + body)  # headers + body, one write
            self._headers_buffer = []
            self._status = status

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode())

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _model(self, name: str, version: Optional[str]) -> Optional[ServedModel]:
            model = server.models.get(name)
            if model is None:
                self._error(404, f"unknown model '{name}'")
                return None
            if version is not None and version != model.version:
                self._error(404, f"model '{name}' has no version '{version}' (has {model.version})")
                return None
            return model

        def _route(self, method: str) -> None:
            start, self._status, model_name = time.perf_counter(), 0, None
            self._body_read = method != "POST"
            server.track(+1)
            try:
                path = self.path.split("?", 1)[0]
                if method == "GET" and path == "/v2/health/live":
                    self._json(200, {"live": True})
                elif method == "GET" and path == "/v2/health/ready":
                    ready = all(m.ready for m in server.models.values())
                    self._json(200 if ready else 503, {"ready": ready})
                elif method == "GET" and path == "/v2":
                    self._json(200, {"name": "sn_deploy", "version": __version__,
                                     "extensions": ["binary_tensor_data"]})
                elif method == "GET" and path == "/metrics":
                    self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                elif (match := _MODEL_PATH.match(path)) is not None:
                    model_name, version, action = match.groups()
                    model = self._model(model_name, version)
                    if model is None:
                        pass
                    elif method == "GET" and action is None:
                        self._json(200, model.metadata())
                    elif method == "GET" and action == "/ready":
                        self._json(200 if model.ready else 503, {"ready": model.ready})
                    elif method == "GET" and action == "/config":
                        self._json(200, {"name": model.name, "max_batch_size":
                                         model.max_batch_size if model.batching else 0})
                    elif method == "POST" and action == "/infer":
                        self._infer(model)
                    else:
                        self._error(405, f"{method} is not supported on {path}")
                else:
                    self._error(404, f"no route {method} {path}")
            except (BrokenPipeError, ConnectionResetError):
                self._status = 499  # the client went away; nothing to answer
                self.close_connection = True
            finally:
                if not self._body_read:  # an unread body would be parsed as the next request
                    self.close_connection = True
                server.track(-1)
                log.info(json.dumps({"method": method, "path": self.path, "status": self._status,
                                     "model": model_name,
                                     "ms": round((time.perf_counter() - start) * 1e3, 3)}))

        def _infer(self, model: ServedModel) -> None:
            metrics = server.metrics
            metrics.requests.labels(model.name).inc()
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if length < 0:
                metrics.failures.labels(model.name, "411").inc()
                self.close_connection = True
                return self._error(411, "Content-Length is required")
            if length > server.options.max_body_bytes:
                metrics.failures.labels(model.name, "413").inc()
                self.close_connection = True
                return self._error(413, f"request body of {length} bytes exceeds the limit of "
                                        f"{server.options.max_body_bytes} (--max-body-mb)")
            body = self.rfile.read(length)
            self._body_read = True
            if len(body) != length:
                self.close_connection = True
                self._status = 499
                return None
            try:
                request = decode_request(body, self.headers.get(HEADER_LENGTH))
                results = model.infer(request.inputs)
                if request.outputs:
                    unknown = [n for n in request.outputs if n not in results]
                    if unknown:
                        raise ProtocolError(f"unknown output {unknown[0]!r}")
                    results = {n: results[n] for n in request.outputs}
                payload, header_length = encode_response(model.name, model.version, request, results)
            except ProtocolError as exc:
                metrics.failures.labels(model.name, "400").inc()
                return self._error(400, str(exc))
            except ModelError as exc:
                metrics.failures.labels(model.name, "500").inc()
                return self._error(500, f"inference failed: {exc}")
            content_type = "application/octet-stream" if header_length is not None \
                else "application/json"
            self._send(200, payload, content_type, header_length)

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

    return Handler
