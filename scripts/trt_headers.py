#!/usr/bin/env python
"""Fetch TensorRT 10.14 public headers for compile checks of the plugin (no TensorRT install).

They ship inside the small PyPI wheel ``kernel-lens`` (its dependencies are not needed and are not
installed). Prints the include folder, or nothing when the download is not possible (offline):
the build then skips the plugin and says so.

    python scripts/trt_headers.py build/tensorrt-headers
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "kernel-lens==2.0.1"
PREFIX = "kernel_lens/include/tensorrt/"


def main() -> int:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "build/tensorrt-headers")
    include = dest / "include"
    if (include / "NvInferRuntime.h").is_file():
        print(include.resolve())
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                               WHEEL], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            print(f"note: could not download {WHEEL} for TensorRT headers; the TensorRT plugin "
                  "will not be built", file=sys.stderr)
            return 0
        include.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in zf.namelist():
                if name.startswith(PREFIX) and name.endswith(".h"):
                    (include / name[len(PREFIX):]).write_bytes(zf.read(name))
    print(include.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
