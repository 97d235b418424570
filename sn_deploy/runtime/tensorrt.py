"""TensorRT engines: build from ``model.trt.onnx`` with the SwitchableNorm_TRT plugin, and run.

Written for the TensorRT 11 Python API (strongly typed networks only: FP16 engines come from FP16
tensors in the ONNX graph, see :mod:`sn_deploy.passes.fp16`), and working with TensorRT 10, whose
STRONGLY_TYPED network flag is used when present. Device buffers are torch CUDA tensors, so no
pycuda is needed. ``tensorrt`` is imported lazily: without it (or without a GPU) every entry point
raises :class:`TensorRTUnavailable` with the fix.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sn_deploy.atomic import atomic_write
from sn_deploy.errors import SnDeployError


class TensorRTUnavailable(SnDeployError):
    """TensorRT or a CUDA GPU is missing on this machine."""


def require():
    """The tensorrt module, or TensorRTUnavailable saying what is missing and what to do."""
    return _trt()


def _trt():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or the bindings failing to find their libraries
        raise TensorRTUnavailable(
            f"the TensorRT Python package is not importable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); install TensorRT 10 or 11 "
            "with its Python bindings (pip install 'tensorrt>=10') on a machine with an NVIDIA GPU, "
            "or run the printed trtexec command there") from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False): TensorRT engines "
            "build and run on an NVIDIA GPU and the runner's buffers are torch CUDA tensors; use a "
            "machine with a GPU and a CUDA build of torch, or run the printed trtexec command there")
    return trt


PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "SwitchableNorm_TRT", "1", ""
_loaded_libraries: dict[str, object] = {}


def load_plugin_library(plugin_lib) -> None:
    """Register the plugin library with TensorRT's global registry, once per process.

    ``IPluginRegistry::loadLibrary`` returns null when a creator is already registered, so a second
    load (engine build then run in one process, or the preload variant already in) is skipped, and
    a failed first load is reported instead of surfacing later as "Plugin not found".
    """
    trt = _trt()
    path = str(Path(plugin_lib).resolve())
    if path in _loaded_libraries:
        return
    if not Path(path).is_file():
        raise SnDeployError(f"plugin library '{plugin_lib}' not found; build it with `make plugins`")
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        handle = registry.load_library(path)
        if handle is None or registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise SnDeployError(f"TensorRT could not load '{plugin_lib}' as a plugin library providing "
                                f"{PLUGIN_NAME} (see its log; was it built for this TensorRT/CUDA?)")
    _loaded_libraries[path] = True


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_command(onnx_path, plugin_lib, engine_path, input_name: str = "input",
                    min_shape: Optional[Sequence[int]] = None,
                    opt_shape: Optional[Sequence[int]] = None,
                    max_shape: Optional[Sequence[int]] = None,
                    timing_cache: Optional[str] = None, strongly_typed: bool = False) -> str:
    """The trtexec command line that builds the same engine.

    ``strongly_typed`` adds ``--stronglyTyped``: TensorRT 10 needs it to honour an FP16 graph's
    types as :func:`build_engine` does (TensorRT 11 is always strongly typed and ignores the flag);
    for an FP32 graph both typings build the same engine, so the command stays short.
    """
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--dynamicPlugins={plugin_lib}"]
    if strongly_typed:
        cmd.append("--stronglyTyped")
    if min_shape is not None:
        cmd += [f"--minShapes={input_name}:{_shape_text(min_shape)}",
                f"--optShapes={input_name}:{_shape_text(opt_shape or min_shape)}",
                f"--maxShapes={input_name}:{_shape_text(max_shape or opt_shape or min_shape)}"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(c) for c in cmd)


def build_engine(
    onnx_path,
    plugin_lib,
    engine_path,
    min_shape: Optional[Sequence[int]] = None,
    opt_shape: Optional[Sequence[int]] = None,
    max_shape: Optional[Sequence[int]] = None,
    timing_cache: Optional[str] = None,
    workspace_mib: int = 1024,
    tf32: bool = True,
) -> Path:
    """Parse the ONNX model (plugin library loaded first), build, and write the plan atomically.

    The network is strongly typed, so an FP16 engine comes from an FP16 graph
    (:func:`sn_deploy.passes.fp16.to_fp16`). The timing cache, if given, is read when it exists and
    written back (atomically) after a successful build. ``tf32=False`` keeps FP32 convolutions
    and matmuls out of TF32 (TensorRT's default on Ampere and later), for tight parity checks.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    load_plugin_library(plugin_lib)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None and int(trt.__version__.split(".")[0]) < 11:  # 11: always, flag deprecated
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SnDeployError(f"TensorRT cannot parse '{onnx_path}': {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    inp = network.get_input(0)
    if min_shape is not None or any(d < 0 for d in inp.shape):
        if min_shape is None:
            raise SnDeployError("the model has dynamic axes: pass --min-shape/--opt-shape/--max-shape")
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, tuple(min_shape), tuple(opt_shape or min_shape),
                          tuple(max_shape or opt_shape or min_shape))
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SnDeployError("TensorRT failed to build the engine (see its log above)")
    if cache is not None:
        atomic_write(timing_cache, bytes(cache.serialize()))
    return atomic_write(engine_path, bytes(plan))


class EngineRunner:
    """Runs a serialized engine on torch CUDA tensors; implements validate.Runner."""

    def __init__(self, engine_path, plugin_lib, name: Optional[str] = None):
        trt = _trt()
        import torch

        self._torch = torch
        self.name = name or Path(engine_path).name
        self.logger = trt.Logger(trt.Logger.WARNING)
        load_plugin_library(plugin_lib)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise SnDeployError(f"'{engine_path}' is not a TensorRT engine for this GPU/version")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names
                            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._dtypes = {n: trt.nptype(self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by engine tensor name (or, for names the engine lacks, in order); outputs as float32."""
        torch = self._torch
        if len(inputs) != len(self.input_names):
            raise SnDeployError(f"the engine takes {len(self.input_names)} input(s) "
                                f"{self.input_names}, got {len(inputs)}")
        if set(inputs) != set(self.input_names):
            inputs = dict(zip(self.input_names, inputs.values()))
        keep = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(inputs[name], self._dtypes[name])).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, self._dtypes[name])).dtype,
                            device="cuda")
            outs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SnDeployError("TensorRT execution failed (see its log)")
        stream.synchronize()
        return {n: t.float().cpu().numpy() for n, t in outs.items()}
