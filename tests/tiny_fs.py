"""Run a command with its output folder on a small tmpfs of its own (full disk, read-only disk).

The tmpfs is mounted in a private user + mount namespace (``unshare -Urm``): nothing on the
machine changes, no root needed where unprivileged user namespaces are allowed, and the mount
vanishes with the process. ``python -m tests.tiny_fs SPEC.json`` is the side that runs inside.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

CHUNK = 1 << 16


def available() -> Optional[str]:
    """None when a private tmpfs can be mounted here, else why not (a skip reason)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not found"
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs ({probe.stderr.strip() or probe.returncode})"
    return None


def run_on_tiny_fs(mount: Path, command: Sequence[str], *, size_kb: int = 4096,
                   free_kb: Optional[int] = None, read_only: bool = False,
                   prefill: Sequence[tuple[Path, str]] = (), timeout: float = 300) -> dict:
    """Mount a tmpfs at ``mount``, copy ``prefill`` (source, relative target) into it, fill it
    up to ``free_kb`` free (or make it read-only), run ``command``; return its exit code,
    stdout, stderr and every file left on the tmpfs as {relative path: [size, mode, sha256]}."""
    mount.mkdir(parents=True, exist_ok=True)
    spec = {"mount": str(mount), "size_kb": size_kb, "free_kb": free_kb, "read_only": read_only,
            "prefill": [[str(s), t] for s, t in prefill], "command": list(command)}
    spec_file = mount.parent / f".{mount.name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(["unshare", "-Urm", sys.executable, "-m", "tests.tiny_fs",
                           str(spec_file)], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny_fs driver failed: {proc.stderr}")
    return json.loads(proc.stdout)


def _fill(folder: Path, free_kb: int) -> None:
    filler = folder / ".filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * CHUNK)
                f.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - free_kb * 1024))


def _listing(root: Path) -> dict:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.name == ".filler":
            continue
        rel = str(path.relative_to(root))
        if path.is_dir():
            files[rel + "/"] = [0, path.stat().st_mode & 0o777, ""]
        else:
            files[rel] = [path.stat().st_size, path.stat().st_mode & 0o777,
                          hashlib.sha256(path.read_bytes()).hexdigest()]
    return files


def _inside(spec: dict) -> dict:
    mount = Path(spec["mount"])
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size_kb']}k,mode=0777", "tmpfs",
                    str(mount)], check=True)
    for src, rel in spec["prefill"]:
        target = mount / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    if spec["free_kb"] is not None:
        _fill(mount, spec["free_kb"])
    if spec["read_only"]:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    proc = subprocess.run(spec["command"], capture_output=True, text=True)
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "files": _listing(mount)}


if __name__ == "__main__":
    print(json.dumps(_inside(json.loads(Path(sys.argv[1]).read_text()))))
