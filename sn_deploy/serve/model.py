"""A served model: an ONNX Runtime session, request validation, and dynamic batching.

Concurrent requests whose tensors agree on every axis but the first are merged up to
``max_batch_size`` samples or ``max_queue_delay`` seconds, run once, and split back. A model whose
inputs have no dynamic batch axis is run one request at a time. When a merged batch fails, its
requests are retried one by one, so one bad request fails alone.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from sn_deploy.serve.protocol import DATATYPES, ORT_TYPES, ProtocolError


class ModelError(RuntimeError):
    """Inference itself failed (HTTP 500): the server keeps serving."""


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list  # ints, -1 for dynamic


@dataclass
class BatchStats:
    """What the metrics need from one executed batch."""

    size: int
    requests: int
    queue_seconds: list[float]
    infer_seconds: float


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    batch: int
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


class ServedModel:
    def __init__(self, name: str, version: str, path: Path, max_batch_size: int = 32,
                 max_queue_delay: float = 0.005, workers: int = 1, threads: Optional[int] = None,
                 reject_nonfinite: bool = True,
                 on_batch: Optional[Callable[[str, BatchStats], None]] = None):
        from sn_deploy.runtime.onnxruntime import create_session

        self.name, self.version, self.path = name, version, Path(path)
        self.session = create_session(self.path, threads=threads)
        self.inputs = [TensorSpec(i.name, ORT_TYPES.get(i.type, i.type),
                                  [d if isinstance(d, int) else -1 for d in i.shape])
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, ORT_TYPES.get(o.type, o.type),
                                   [d if isinstance(d, int) else -1 for d in o.shape])
                        for o in self.session.get_outputs()]
        self.batching = max_batch_size > 1 and all(s.shape and s.shape[0] == -1 for s in self.inputs)
        self.max_batch_size = max_batch_size if self.batching else 1
        self.max_queue_delay = max_queue_delay
        self.reject_nonfinite = reject_nonfinite
        self.on_batch = on_batch
        self.ready = False
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
        self._workers = [threading.Thread(target=self._worker, name=f"batcher-{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._workers:
            t.start()

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict:
        spec = lambda s: {"name": s.name, "datatype": s.datatype, "shape": s.shape}  # noqa: E731
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [spec(s) for s in self.inputs], "outputs": [spec(s) for s in self.outputs]}

    def warm_up(self) -> None:
        """One inference on zeros so the first request does not pay for allocation.

        Dynamic axes get 1 for the batch and 16 elsewhere (a 1x1 plane is not a valid SN input).
        """
        feeds = {}
        for s in self.inputs:
            shape = [(1 if i == 0 else 16) if d == -1 else d for i, d in enumerate(s.shape)]
            feeds[s.name] = np.zeros(shape, DATATYPES.get(s.datatype, np.float32))
        self.session.run(None, feeds)
        self.ready = True

    # ------------------------------------------------------------------ requests
    def validate(self, inputs: dict[str, np.ndarray]) -> int:
        """Check names, types and shapes against the model; returns the batch size."""
        expected = {s.name: s for s in self.inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise ProtocolError(f"unknown input {unknown[0]!r}; model '{self.name}' takes "
                                f"{', '.join(expected)}")
        missing = sorted(set(expected) - set(inputs))
        if missing:
            raise ProtocolError(f"missing input {missing[0]!r}")
        batch = None
        for name, array in inputs.items():
            spec = expected[name]
            if array.dtype != np.dtype(DATATYPES.get(spec.datatype, object)):
                raise ProtocolError(f"input '{name}' has datatype {array.dtype}, model expects "
                                    f"{spec.datatype}")
            if array.ndim != len(spec.shape) or any(
                    d != -1 and d != a for d, a in zip(spec.shape, array.shape)):
                raise ProtocolError(f"input '{name}' has shape {list(array.shape)}, model expects "
                                    f"{spec.shape} (-1: any)")
            if self.reject_nonfinite and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ProtocolError(f"input '{name}' contains NaN or Inf values")
            if array.ndim and array.shape[0] == 0:
                raise ProtocolError(f"input '{name}' has an empty batch")
            b = array.shape[0] if array.ndim else 1
            if batch is not None and b != batch:
                raise ProtocolError("inputs disagree on the batch size")
            batch = b
        if self.batching and batch > self.max_batch_size:
            raise ProtocolError(f"batch {batch} exceeds max batch size {self.max_batch_size}")
        return batch or 1

    def infer(self, inputs: dict[str, np.ndarray], timeout: float = 60.0) -> dict[str, np.ndarray]:
        batch = self.validate(inputs)
        pending = _Pending(inputs, batch, Future())
        self._queue.put(pending)
        return pending.future.result(timeout=timeout)

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(timeout=10)

    # ------------------------------------------------------------------ batching
    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """Requests compatible with ``first`` up to the batch/delay limits; False on shutdown."""
        group, total = [first], first.batch
        if not self.batching:
            return group, True
        key = {n: a.shape[1:] for n, a in first.inputs.items()}
        deadline = first.enqueued + self.max_queue_delay
        held: list[_Pending] = []
        alive = True
        while total < self.max_batch_size:
            wait = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=max(wait, 0)) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                alive = False
                break
            if total + item.batch <= self.max_batch_size and \
                    all(item.inputs[n].shape[1:] == s for n, s in key.items()):
                group.append(item)
                total += item.batch
            else:
                held.append(item)
        for item in held:  # another worker (or the next round) takes them
            self._queue.put(item)
        return group, alive

    def _run(self, group: list[_Pending]) -> None:
        names = list(group[0].inputs)
        feeds = {n: np.concatenate([p.inputs[n] for p in group]) if len(group) > 1
                 else group[0].inputs[n] for n in names}
        start = time.perf_counter()
        try:
            outs = self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            if len(group) > 1:
                for p in group:
                    self._run([p])
                return
            group[0].future.set_exception(ModelError(str(exc).strip().splitlines()[0][:300]))
            return
        elapsed = time.perf_counter() - start
        names_out = [o.name for o in self.outputs]
        offset = 0
        for p in group:
            p.future.set_result({n: o[offset:offset + p.batch] if len(group) > 1 else o
                                 for n, o in zip(names_out, outs)})
            offset += p.batch
        if self.on_batch is not None:
            self.on_batch(self.name, BatchStats(offset, len(group),
                                                [start - p.enqueued for p in group], elapsed))

    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, alive = self._collect(first)
            self._run(group)
            if not alive:
                return
