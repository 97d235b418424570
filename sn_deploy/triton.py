"""A Triton Inference Server model repository for the exported model (scale-out path).

``REPO/<name>/1/model.onnx`` with a ``config.pbtxt`` for Triton's onnxruntime backend: the
decomposed model runs there with no extra library. With the TensorRT target, ``REPO/<name>_trt``
gets the config for a ``tensorrt_plan`` model; the plan itself is built on the serving GPU with
``sn-build-engine`` and Triton loads the plugin through ``--backend-config=tensorrt,plugins=...``
(or ``LD_PRELOAD``) with ``libsn_trt_plugin_preload.so``. ``sn-serve`` reads the same layout.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from sn_deploy.atomic import atomic_write
from sn_deploy.export import save_model_atomic

_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
          onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}


def _dims(value_info: onnx.ValueInfoProto, batched: bool) -> list[int]:
    dims = [d.dim_value if d.HasField("dim_value") else -1
            for d in value_info.type.tensor_type.shape.dim]
    return dims[1:] if batched else dims


def _tensors(kind: str, infos, batched: bool) -> str:
    items = []
    for vi in infos:
        dtype = _TYPES.get(vi.type.tensor_type.elem_type, "TYPE_FP32")
        items.append(f'  {{ name: "{vi.name}" data_type: {dtype} dims: {_dims(vi, batched)} }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def model_config(model: onnx.ModelProto, name: str, platform: str, max_batch_size: int,
                 max_queue_delay_us: int = 5000, instances: int = 1, kind: str = "KIND_CPU") -> str:
    """config.pbtxt text; batching is declared only when the input's first axis is dynamic."""
    first = model.graph.input[0].type.tensor_type.shape.dim
    batched = max_batch_size > 0 and bool(first) and not first[0].HasField("dim_value")
    text = (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size if batched else 0}\n'
            + _tensors("input", model.graph.input, batched)
            + _tensors("output", model.graph.output, batched))
    if batched:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
    text += f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
    return text


def write_triton_repo(repo: Path, name: str, decomposed: onnx.ModelProto, max_batch_size: int = 32,
                      tensorrt: bool = False) -> list[Path]:
    """Write the repository entries; returns the files written."""
    repo = Path(repo)
    written = []
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    written.append(save_model_atomic(decomposed, version / "model.onnx"))
    written.append(atomic_write(repo / name / "config.pbtxt",
                                model_config(decomposed, name, "onnxruntime_onnx", max_batch_size)))
    if tensorrt:
        trt_dir = repo / f"{name}_trt"
        (trt_dir / "1").mkdir(parents=True, exist_ok=True)
        written.append(atomic_write(trt_dir / "config.pbtxt", model_config(
            decomposed, f"{name}_trt", "tensorrt_plan", max_batch_size, kind="KIND_GPU")))
        written.append(atomic_write(trt_dir / "README.md", (
            "Build `1/model.plan` on the serving GPU:\n\n"
            "    sn-build-engine model.trt.onnx --plugin-lib libsn_trt_plugin.so "
            "--min-shape ... --opt-shape ... --max-shape ... -o 1/model.plan\n\n"
            "and start Triton with the plugin: `tritonserver --model-repository=REPO "
            "--backend-config=tensorrt,plugins=/path/libsn_trt_plugin_preload.so` "
            "(or `LD_PRELOAD=/path/libsn_trt_plugin_preload.so tritonserver ...`).\n")))
    return written
