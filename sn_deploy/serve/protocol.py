"""The Open Inference Protocol (KServe v2) REST encoding, with the binary tensor data extension.

A request body is JSON, optionally followed by raw tensor bytes: the header
``Inference-Header-Content-Length`` gives the JSON's length, and each input with
``parameters.binary_data_size`` takes that many bytes, in input order. tritonclient sends tensors
this way by default and asks for binary outputs; plain JSON ``data`` works too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL",
}


class ProtocolError(ValueError):
    """A malformed or inconsistent request: answered with HTTP 400 and the message."""


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    raise ProtocolError(f"unsupported output dtype {array.dtype}")


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, Optional[bool]] = field(default_factory=dict)  # name -> binary; {}: all
    binary_default: bool = False

    def wants_binary(self, name: str) -> bool:
        flag = self.outputs.get(name)
        return self.binary_default if flag is None else flag


def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    return body


def decode_request(body: bytes, header_length: Optional[str]) -> InferRequest:
    """Parse an infer request (JSON or JSON + binary tensors)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got '{header_length}'") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} exceeds the body length {len(body)}")
        head, binary = _parse_json(body[:n]), memoryview(body)[n:]
    else:
        head, binary = _parse_json(body), memoryview(b"")
    specs = head.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("'inputs' must be a non-empty list")
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        if not isinstance(spec, dict):
            raise ProtocolError("each input must be an object with name, shape, datatype")
        name, shape, dt = spec.get("name"), spec.get("shape"), spec.get("datatype")
        if not isinstance(name, str):
            raise ProtocolError("input without a 'name'")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ProtocolError(f"input '{name}': 'shape' must be a list of non-negative integers")
        if dt not in DATATYPES:
            raise ProtocolError(f"input '{name}': unknown datatype {dt!r}")
        dtype = np.dtype(DATATYPES[dt])
        count = int(np.prod(shape)) if shape else 1
        params = spec.get("parameters") or {}
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise ProtocolError(f"input '{name}': binary_data_size {size} does not match shape "
                                    f"{shape} of {dt} ({count * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise ProtocolError(f"input '{name}': binary data is shorter than declared")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in spec:
                raise ProtocolError(f"input '{name}': no 'data' and no binary_data_size")
            try:
                array = np.asarray(spec["data"], dtype=dtype)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"input '{name}': data is not {dt}: {exc}") from None
            if array.size != count:
                raise ProtocolError(f"input '{name}': {array.size} values for shape {shape} "
                                    f"({count} expected)")
            array = array.reshape(shape)
        if name in inputs:
            raise ProtocolError(f"input '{name}' given twice")
        inputs[name] = array
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} trailing bytes after the declared binary inputs")
    outputs: dict[str, Optional[bool]] = {}
    for spec in head.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each requested output must be an object with a 'name'")
        flag = (spec.get("parameters") or {}).get("binary_data")
        outputs[spec["name"]] = None if flag is None else bool(flag)
    binary_default = bool((head.get("parameters") or {}).get("binary_data_output", False))
    rid = head.get("id")
    return InferRequest(str(rid) if rid is not None else None, inputs, outputs, binary_default)


def encode_response(model: str, version: str, request: InferRequest,
                    results: dict[str, np.ndarray]) -> tuple[bytes, Optional[int]]:
    """Response body and, when binary outputs follow the JSON, the JSON's length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in results.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array),
                                 "shape": list(array.shape)}
        if request.wants_binary(name):
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    text = json.dumps(head).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)
