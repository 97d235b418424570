"""Calibration data: ``.npy``/``.npz`` arrays (N, C, …) and image folders, as float32 batches.

Batch order matters for reproducibility: ``sequential`` takes batches 0..K−1 in file order;
``random`` samples B·K distinct items with a seeded generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import yaml

from sn_deploy.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


@dataclass
class Preprocess:
    """Image preprocessing (ImageNet defaults): resize shorter side, center crop, normalize."""

    resize: int = 256
    crop: int = 224
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    channels: int = 3  # 3: RGB, 1: grayscale

    def __post_init__(self) -> None:
        """Refuse settings that would broadcast silently (3 means on 1 channel) or divide by 0."""
        if self.channels not in (1, 3):
            raise InputError(f"preprocess.channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (int, float)):
                values = [values]
            values = tuple(float(v) for v in values)
            if len(values) not in (1, self.channels):
                raise InputError(f"preprocess.{name} has {len(values)} values for "
                                 f"{self.channels} channel(s); give 1 or {self.channels}")
            setattr(self, name, values)
        if any(v <= 0 for v in self.std):
            raise InputError("preprocess.std values must be positive")
        if not (0 < self.crop <= self.resize):
            raise InputError(f"preprocess needs 0 < crop <= resize, got crop {self.crop}, "
                             f"resize {self.resize}")


@dataclass
class Recipe:
    """A calibration recipe file (YAML): preprocessing and the default B and K."""

    batch_size: int = 32
    num_batches: int = 200
    preprocess: Preprocess = field(default_factory=Preprocess)


_RECIPE_FIELDS = {"batch_size", "num_batches", "preprocess"}


def load_recipe(path: Optional[str]) -> Recipe:
    """Read a YAML recipe; unknown fields are refused (a typo must not fall back to a default)."""
    if path is None:
        return Recipe()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"recipe '{path}' not found; see calibration/ for examples") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe '{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("preprocess") or {}, dict):
        raise InputError(f"recipe '{path}' must be a mapping of fields; see calibration/README.md")
    unknown = sorted(set(map(str, raw)) - _RECIPE_FIELDS)
    if unknown:
        raise InputError(f"recipe '{path}': unknown field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_RECIPE_FIELDS))} (see calibration/README.md)")
    try:
        pre = Preprocess(**(raw.get("preprocess") or {}))
        return Recipe(batch_size=int(raw.get("batch_size", 32)),
                      num_batches=int(raw.get("num_batches", 200)), preprocess=pre)
    except (TypeError, ValueError) as exc:
        raise InputError(f"recipe '{path}': {exc}; see calibration/README.md") from None
    except InputError as exc:
        raise InputError(f"recipe '{path}': {exc}") from None


def _npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from a .npy header, reading nothing else."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:  # 3.0 (UTF-8 field names) has no public reader
            shape, _, dtype = fmt._read_array_header(f, version)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{where} is not a readable .npy array ({str(exc).splitlines()[0]}); "
                         "save it with numpy.save") from None
    return tuple(shape), np.dtype(dtype), f.tell()


def _check_npy_header(shape, dtype: np.dtype, data_bytes: int, where: str) -> None:
    """Refuse before anything is allocated: pickled objects, and headers that lie about size."""
    if dtype.hasobject:
        raise InputError(f"{where} holds Python objects (dtype {dtype}): loading them would "
                         "unpickle, which runs code from the file; save a numeric array, e.g. "
                         "numpy.save(path, x.astype(numpy.float32))")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > data_bytes:
        raise InputError(f"{where} is truncated or corrupt: its header says shape {shape} of "
                         f"{dtype} ({claimed} bytes) but it holds {data_bytes} bytes of data; "
                         "save it again")


def load_array(spec: str, what: str) -> np.ndarray:
    """A .npy (memory-mapped) or an array of a .npz (``file.npz:name``, default its first).

    Never unpickles and never trusts a header: the claimed size is checked against the file
    before any allocation. ``what`` names the option in errors (``--inputs 'x.npy'``).
    """
    file, key = spec, ""
    if ".npz:" in spec:
        file, _, key = spec.rpartition(":")
    path = Path(file)
    where = f"{what} '{file}'"
    with open(path, "rb") as f:
        magic = f.read(6)
        if magic.startswith(b"PK"):
            if path.suffix != ".npz":
                raise InputError(f"{where} is a zip archive (.npz), not a .npy array; rename it "
                                 "to .npz (FILE.npz:NAME picks one of its arrays)")
            return _npz_array(path, key, what)
        if magic != b"\x93NUMPY":
            kind = "an empty file" if not magic else "not a NumPy file (a pickle or another format?)"
            raise InputError(f"{where} is {kind}; give an array saved with numpy.save "
                             "(.npy) or numpy.savez (.npz)")
        f.seek(0)
        shape, dtype, offset = _npy_header(f, where)
    _check_npy_header(shape, dtype, path.stat().st_size - offset, where)
    try:
        mmap = "r" if math.prod(shape) > 0 else None  # a 0-byte map is refused by mmap
        return np.load(path, mmap_mode=mmap, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{where} is not a readable .npy array ({exc})") from None


def _npz_array(path: Path, key: str, what: str) -> np.ndarray:
    import zipfile

    where = f"{what} '{path}'"
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if not names:
                raise InputError(f"{where} holds no arrays; save one with "
                                 "numpy.savez(path, data=array)")
            if key and key not in names:
                raise InputError(f"{where} has no array '{key}' (has {', '.join(names)})")
            member = archive.getinfo((key or names[0]) + ".npy")
            inner = f"{what} '{path}:{member.filename[:-4]}'"
            with archive.open(member) as f:
                shape, dtype, offset = _npy_header(f, inner)
            _check_npy_header(shape, dtype, member.file_size - offset, inner)
        with np.load(path, allow_pickle=False) as npz:
            return npz[key or names[0]]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{where} is not a readable .npz archive ({exc}); save it with "
                         "numpy.savez") from None


class ArraySource:
    """Samples from a .npy / .npz array (memory-mapped for .npy)."""

    def __init__(self, path: str):
        file = path.rpartition(":")[0] if ".npz:" in path else path
        if not Path(file).is_file():
            raise InputError(f"calibration data '{file}' not found; give a .npy/.npz file or an "
                             "image folder")
        arr = load_array(path, "calibration data")
        if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"calibration data '{file}' has shape {arr.shape} and dtype "
                             f"{arr.dtype}; expected a numeric array (N, C, ...)")
        self.array = arr

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def get(self, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices)  # memory-mapped reads in file order
        out = np.empty((len(indices),) + self.array.shape[1:], np.float32)
        out[order] = self.array[np.sort(indices)]
        return out


class ImageFolderSource:
    """Images found recursively under a folder, preprocessed with PIL."""

    def __init__(self, folder: str, pre: Preprocess):
        root = Path(folder)
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{folder}'")
        self.pre = pre

    def __len__(self) -> int:
        return len(self.files)

    def sample_shape(self) -> tuple[int, ...]:
        return (self.pre.channels, self.pre.crop, self.pre.crop)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        pre = self.pre
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if pre.channels == 3 else "L")
                w, h = img.size
                s = pre.resize / min(w, h)
                img = img.resize((max(pre.crop, round(w * s)), max(pre.crop, round(h * s))),
                                 Image.BILINEAR)
                w, h = img.size
                left, top = (w - pre.crop) // 2, (h - pre.crop) // 2
                img = img.crop((left, top, left + pre.crop, top + pre.crop))
                arr = np.asarray(img, np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read image '{path}' ({exc}); remove or fix it") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        mean = np.asarray(pre.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(pre.std, np.float32).reshape(-1, 1, 1)
        return (arr - mean) / std

    def get(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self._load(self.files[i]) for i in indices])


def open_source(path: str, recipe: Optional[str] = None, preprocess: Optional[Preprocess] = None):
    """A data source for ``--data``: an array file or an image folder."""
    if Path(path).is_dir():
        return ImageFolderSource(path, preprocess or load_recipe(recipe).preprocess)
    return ArraySource(path)


class _PlannedBatches(torch.utils.data.Dataset):
    """The planned batches as a map-style dataset: item j is one whole batch.

    Worker processes return errors as values: the DataLoader would re-raise them wrapped in a
    multi-line traceback, and users get one line.
    """

    def __init__(self, source, plan: list[tuple[int, np.ndarray]]):
        self.source, self.plan = source, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int):
        k, indices = self.plan[j]
        try:  # a tensor, so the loader can pin it
            return k, torch.from_numpy(self.source.get(indices)), ""
        except InputError as exc:
            return k, None, str(exc)


def _as_is(item):
    return item


def default_workers(source) -> int:
    """Image decoding is worth worker processes; memory-mapped arrays are not."""
    import os

    return min(4, os.cpu_count() or 1) if isinstance(source, ImageFolderSource) else 0


def batches(source, batch_size: int, num_batches: int, order: str = "sequential",
            seed: int = 0, keep: Optional[Callable[[int], bool]] = None,
            workers: Optional[int] = None, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """K batches of B samples as float32 tensors; refuses too little data up front.

    ``keep(k)`` selects which of the K batches this process loads (distributed calibration: the
    batch plan is the same on every rank, each rank keeps its share; a resumed run skips the
    batches it has done).  ``workers`` > 0 loads them in that many DataLoader worker processes,
    in plan order (default: :func:`default_workers`).  ``pin_memory``: batches come in
    page-locked memory (the loader's pinning thread, or here), so a GPU copies them without
    blocking; it needs CUDA.
    """
    if batch_size < 2:
        raise InputError("--batch-size must be at least 2: BN statistics of one sample are "
                         "undefined (unbiased variance)")
    if num_batches < 1:
        raise InputError("--num-batches must be at least 1")
    need, have = batch_size * num_batches, len(source)
    if have < need:
        raise InputError(
            f"calibration needs {batch_size} x {num_batches} = {need} samples but the data has "
            f"{have}; lower --batch-size/--num-batches or add data"
        )
    if order == "sequential":
        picked = np.arange(need)
    elif order == "random":
        picked = np.random.default_rng(seed).choice(have, size=need, replace=False)
    else:
        raise InputError(f"unknown --order '{order}': use sequential or random")
    if workers is None:
        workers = default_workers(source)
    if workers < 0:
        raise InputError("--workers must be >= 0 (0: load in this process)")
    plan = [(k, picked[k * batch_size:(k + 1) * batch_size]) for k in range(num_batches)
            if keep is None or keep(k)]
    if workers == 0 or len(plan) < 2:
        loaded = ((k, torch.from_numpy(source.get(indices)), "") for k, indices in plan)
    else:
        loaded = iter(torch.utils.data.DataLoader(
            _PlannedBatches(source, plan), batch_size=None, shuffle=False,
            num_workers=min(workers, len(plan)), collate_fn=_as_is, pin_memory=pin_memory))
        pin_memory = False  # the loader's thread pins
    for k, batch, error in loaded:
        if error:
            raise InputError(error)
        if not torch.isfinite(batch).all():
            raise InputError(f"calibration batch {k} holds NaN or infinite values; "
                             "clean the data (statistics would be NaN)")
        yield batch.pin_memory() if pin_memory else batch
