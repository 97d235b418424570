"""The inference server: ONNX Runtime behind the Open Inference Protocol (``sn-serve``)."""
