"""Batch-average calibration of the BN branch's inference statistics.

SN's BN branch is trained on batch statistics; its moving averages lag the final weights.  The
official remedy (``using_moving_average=False``): freeze everything, run K training batches with the
SN layers computing batch statistics, and use the pooled statistics

    running_mean = mean_i(mean_bn_i)
    running_var  = mean_i(var_bn_i + mean_bn_i²) − running_mean²   (pooled, not mean_i(var_bn_i))

computed here in float64 in the cancellation-free form ``mean_i(var_bn_i) +
mean_i((mean_bn_i − running_mean)²)``.  The pass runs on any device (:mod:`sn_deploy.device`): the
model and batches go there, the float64 sums stay there (on the CPU for MPS, which has no float64),
CUDA convolutions run in IEEE float32 (not TF32) so the statistics equal the CPU's to ~1e-6, and
the results are written back into the model where it was.  Only the SN layers run in training mode (so later layers
see batch-normalized activations, as in the official procedure); dropout and plain BatchNorm stay
in eval, and no parameter changes.  ``precise_bn=True`` batch-averages plain BatchNorm layers with
the same pooled rule: they too normalize with batch statistics during the pass (as SN does, so later
layers see what they saw in training; their buffers are not touched by the forward), and the pooled
variance is built from their *unbiased* per-batch variances, torch's convention for
``BatchNorm.running_var`` (``num_batches_tracked`` is left as it is).
"""
from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sn_deploy.atomic import atomic_write
from sn_deploy.device import (DeviceSpec, ieee_fp32, moments_dtype, resolve_device,
                              statistics_device, synchronize)
from sn_deploy.errors import InputError
from sn_deploy.nn import BATCH_NORM_TYPES, DegenerateInputError, _SwitchNorm, switch_norm_layers



class _PooledStats:
    """Per-layer float64 sums Σ(mean_i − s), Σ var_i, Σ(mean_i − s)² and the count.

    The shift s is the layer's previous running mean: close to the batch means (so the squares do
    not cancel) and the same on every rank, so the sums of several processes simply add up.
    """

    def __init__(self, shift: torch.Tensor, device: torch.device) -> None:
        self.count = 0
        self.device = device
        # a non-finite stored mean (broken checkpoint) must not poison the sums
        self.shift = shift.detach().to(device).double().reshape(-1).nan_to_num(0.0, 0.0, 0.0)
        self.sum_mean = torch.zeros_like(self.shift)
        self.sum_var = torch.zeros_like(self.shift)
        self.sum_sq = torch.zeros_like(self.shift)

    def all_reduce(self, rank_device: torch.device) -> None:
        """Add up the sums of every rank (torch.distributed), once, at the end."""
        from sn_deploy.distributed import all_reduce_sum

        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        packed = all_reduce_sum(torch.cat([self.sum_mean, self.sum_var, self.sum_sq, count]),
                                rank_device)
        n = self.shift.numel()
        self.sum_mean, self.sum_var, self.sum_sq = packed[:n], packed[n:2 * n], packed[2 * n:3 * n]
        self.count = int(round(packed[-1].item()))

    def add(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        mean = mean.detach().to(self.device).double().reshape(-1)
        var = var.detach().to(self.device).double().reshape(-1)
        d = mean - self.shift
        self.sum_mean += d
        self.sum_var += var
        self.sum_sq += d * d
        self.count += 1

    def state(self) -> dict:
        """The sums as CPU tensors (a state file must load on any machine)."""
        return {"count": self.count, "shift": self.shift.cpu(), "sum_mean": self.sum_mean.cpu(),
                "sum_var": self.sum_var.cpu(), "sum_sq": self.sum_sq.cpu()}

    def restore(self, state: dict) -> None:
        if state["shift"].shape != self.shift.shape:
            raise InputError("the calibration state does not match the model's layer sizes; "
                             "delete it to start over")
        self.count = int(state["count"])
        self.shift, self.sum_mean, self.sum_var, self.sum_sq = (
            state[k].to(self.device).double() for k in ("shift", "sum_mean", "sum_var", "sum_sq"))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled mean and variance, float64 on the CPU."""
        k = self.count
        md = self.sum_mean / k
        mean, var = self.shift + md, self.sum_var / k + (self.sum_sq / k - md * md).clamp_min(0)
        return mean.cpu(), var.cpu()


@dataclass
class LayerCalibration:
    name: str
    kind: str
    batches: int
    mean_abs_change_mean: float
    mean_abs_change_var: float
    mean_weights: dict[str, float] = field(default_factory=dict)
    var_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class CalibrationResult:
    num_batches: int
    num_samples: int
    seconds: float
    layers: list[LayerCalibration] = field(default_factory=list)
    resumed_from: int = 0  # batches taken from a saved state instead of being run again
    device: str = "cpu"  # where the pass ran (one rank's device in a distributed run)

    @property
    def images_per_second(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "num_batches": self.num_batches, "num_samples": self.num_samples,
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 1),
            "resumed_from_batch": self.resumed_from, "device": self.device,
            "layers": [vars(layer) for layer in self.layers],
        }


STATE_VERSION = 1


@dataclass
class ResumeState:
    """Where a calibration run saves its partial sums (``--checkpoint-every``) and resumes from.

    ``fingerprint`` identifies the run (weights, data, batch plan, rank): a state file from any
    other run is refused rather than silently mixed in.  Each rank of a distributed run has its
    own file; the sums are float64 and added in the same order, so a resumed run ends with the
    same statistics, bit for bit, as an uninterrupted one.
    """

    path: Path
    every: int
    fingerprint: dict
    saved: Optional[dict] = field(default=None, repr=False)  # what the file held at the start

    @classmethod
    def open(cls, path: Path, every: int, fingerprint: dict) -> "ResumeState":
        """Read (and check) the state file once, before the run; no file: a fresh start."""
        state = cls(Path(path), every, fingerprint)
        state.saved = state._read()
        return state

    @property
    def done(self) -> int:
        return int(self.saved["done"]) if self.saved else 0

    def _read(self) -> Optional[dict]:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise InputError(f"calibration state '{self.path}' is unreadable ({type(exc).__name__}); "
                             "delete it to start over") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InputError(f"'{self.path}' is not a calibration state of this version; "
                             "delete it to start over")
        theirs = state.get("fingerprint", {})
        diff = sorted(k for k in set(theirs) | set(self.fingerprint)
                      if theirs.get(k) != self.fingerprint.get(k))
        if diff:
            raise InputError(f"calibration state '{self.path}' belongs to another run (different "
                             f"{', '.join(diff)}); rerun with the same settings or delete it")
        return state

    def save(self, done: int, samples: int, seconds: float, stats: dict) -> None:
        buf = io.BytesIO()
        torch.save({"version": STATE_VERSION, "fingerprint": self.fingerprint, "done": done,
                    "samples": samples, "seconds": seconds,
                    "stats": {name: st.state() for name, st in stats.items()}}, buf)
        atomic_write(self.path, buf.getvalue(), keep_on_failure=True)  # for the rerun


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer: a resumed run must start from the same weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _bn_batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and unbiased variance (torch's running_var convention)."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.to(moments_dtype(x.device)), dim=dims, unbiased=True)
    return mean, var


def _bn_train_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm output (batch statistics) without touching the running buffers."""
    return F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, momentum=0.0,
                        eps=layer.eps)


def _calibrated_layers(model: nn.Module, precise_bn: bool) -> tuple[list, list]:
    sn_layers = [(n, m) for n, m in switch_norm_layers(model) if m.using_bn]
    bn_layers = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, BATCH_NORM_TYPES) and m.running_mean is not None] if precise_bn else []
    if not sn_layers and not bn_layers:
        has_sn = bool(switch_norm_layers(model))
        raise InputError(
            "the model has no SwitchNorm layer with a BN branch"
            + (" (all use using_bn=False)" if has_sn else "")
            + (" and no BatchNorm layer with running statistics" if precise_bn else "")
            + ": there is nothing to calibrate; skip calibration and export it as it is"
        )
    return sn_layers, bn_layers


def calibrate_batch_average(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    num_batches: int,
    precise_bn: bool = False,
    progress: bool = True,
    distributed: bool = False,
    resume: Optional[ResumeState] = None,
    device: DeviceSpec = None,
) -> CalibrationResult:
    """Set every SN layer's running stats (and BN's, with precise_bn) to batch averages, in place.

    ``num_batches`` is the number of batches this process runs.  ``device``: where the pass runs
    (None: where the model's parameters are); the model goes there for the pass and comes back
    with its new statistics, and batches are copied there without blocking (pin them for that).
    ``distributed``: this process is one rank of an initialized torch.distributed group and
    ``batches`` holds its share of the K batches; the sums (and batch counts) are all-reduced once
    at the end, on the backend's device, so every rank ends with the statistics of all K batches.
    ``resume``: partial sums are saved every ``resume.every`` batches; ``batches`` must then
    yield only the batches not yet done (see :func:`calibrate_from_data`).
    """
    sn_layers, bn_layers = _calibrated_layers(model, precise_bn)
    home = next((t.device for t in _tensors(model)), torch.device("cpu"))
    device = home if device is None else resolve_device(device)
    stats_on = statistics_device(device)
    stats = {n: _PooledStats(m.running_mean, stats_on) for n, m in sn_layers + bn_layers}
    done, samples, previous_seconds = 0, 0, 0.0
    saved = resume.saved if resume is not None else None
    if saved is not None:
        if set(saved["stats"]) != set(stats):
            raise InputError(f"calibration state '{resume.path}' holds other layers; delete it")
        for name, st in stats.items():
            st.restore(saved["stats"][name])
        done, samples, previous_seconds = int(saved["done"]), int(saved["samples"]), float(saved["seconds"])
    was_training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    observers = {m: m.batch_stats_observer for _, m in sn_layers}
    hooks = []

    def sn_observer(layer: _SwitchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
        stats[names[layer]].add(mean, var)

    names = {m: n for n, m in sn_layers}
    try:
        model.to(device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for _, m in sn_layers:
            m.train()
            m.batch_stats_observer = sn_observer
        for name, m in bn_layers:
            def hook(mod, args, output, name=name):
                stats[name].add(*_bn_batch_stats(args[0]))
                return _bn_train_forward(mod, args[0])
            hooks.append(m.register_forward_hook(hook))
        start = time.perf_counter()
        failure: Optional[InputError] = None
        iterator = _progress(batches, num_batches, progress, done)
        try:
            with torch.no_grad(), ieee_fp32(device):
                for i, batch in enumerate(iterator, start=done):
                    if i >= num_batches:
                        break
                    _forward(model, batch, i, device)
                    samples += int(batch.shape[0])
                    done = i + 1
                    if resume is not None and done % resume.every == 0:
                        resume.save(done, samples, previous_seconds + time.perf_counter() - start,
                                    stats)
            synchronize(device)  # the timing covers the device's queued work
        except InputError as exc:
            failure = exc
        if distributed:
            _agree_on_failure(failure, device)
        if failure is not None:
            raise failure
        seconds = previous_seconds + time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
        for m, observer in observers.items():
            m.batch_stats_observer = observer
        for m, t in was_training.items():
            m.train(t)
        for p, r in requires_grad.items():
            p.requires_grad_(r)
        model.to(home)

    if distributed:
        for s in stats.values():
            s.all_reduce(device)
        totals = _all_reduce([float(samples), float(num_batches)], device)
        samples, num_batches = int(totals[0]), int(totals[1])
    got = min((s.count for s in stats.values()), default=num_batches)
    if stats and got < num_batches:
        raise InputError(f"calibration got only {got} of {num_batches} batches from the data")
    result = CalibrationResult(num_batches=num_batches, num_samples=samples, seconds=seconds,
                               device=str(device))
    result.layers = [_store(name, m, *stats[name].result(), stats[name].count)
                     for name, m in sn_layers + bn_layers]
    return result


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _forward(model: nn.Module, batch: torch.Tensor, i: int, device: torch.device) -> None:
    """One calibration forward; what the model or the device refuses becomes one InputError."""
    try:
        model(batch.to(device, non_blocking=True))
    except DegenerateInputError as exc:
        raise InputError(f"calibration batch {i}: {exc}") from None
    except torch.OutOfMemoryError:
        raise InputError(f"calibration batch {i} of shape {tuple(batch.shape)} does not fit in "
                         f"the memory of {device}; use smaller batches") from None
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise InputError(
            f"the model rejects calibration batch {i} of shape "
            f"{tuple(batch.shape)} ({first}); check --data and the "
            "preprocessing") from None


def _store(name: str, m: nn.Module, mean: torch.Tensor, var: torch.Tensor,
           batches: int) -> LayerCalibration:
    """Write a layer's pooled statistics (float64, CPU) into its buffers; report the change."""
    old_m = m.running_mean.detach().cpu().double().reshape(-1)
    old_v = m.running_var.detach().cpu().double().reshape(-1)
    with torch.no_grad():
        m.running_mean.copy_(mean.reshape(m.running_mean.shape))
        m.running_var.copy_(var.reshape(m.running_var.shape))
    entry = LayerCalibration(
        name=name, kind=type(m).__name__, batches=batches,
        mean_abs_change_mean=float((mean - old_m).abs().mean()),
        mean_abs_change_var=float((var - old_v).abs().mean()),
    )
    if isinstance(m, _SwitchNorm):
        mw, vw = (w.detach().tolist() for w in m.mixing_weights())
        entry.mean_weights = dict(zip(m.branch_names, mw))
        entry.var_weights = dict(zip(m.branch_names, vw))
    return entry


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over every rank (float64, exact for counts)."""
    from sn_deploy.distributed import all_reduce_sum

    return all_reduce_sum(torch.tensor(values, dtype=torch.float64), device).tolist()


def _agree_on_failure(failure: Optional[InputError], device: torch.device) -> None:
    """Every rank learns whether any rank failed, so none waits forever in the final all-reduce."""
    failed = _all_reduce([1.0 if failure is not None else 0.0], device)[0]
    if failure is None and failed > 0:
        raise InputError(f"{int(failed)} other rank(s) failed; see their error above")


def calibrate_from_data(
    model: nn.Module,
    data: str,
    *,
    recipe=None,
    batch_size: Optional[int] = None,
    num_batches: Optional[int] = None,
    order: str = "random",
    seed: int = 0,
    precise_bn: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    workers: Optional[int] = None,
    state_path: Optional[Path] = None,
    checkpoint_every: int = 0,
    device: DeviceSpec = None,
    distributed: Optional[bool] = None,
) -> CalibrationResult:
    """Calibrate on ``data`` (array file or image folder): the recipe (a path, a loaded Recipe, or
    None for the defaults) supplies preprocessing and any batch size/count not given; with
    ``world > 1`` this rank takes batches k ≡ rank (mod world).

    ``workers``: DataLoader worker processes decoding images (default: up to 4 for image
    folders, none for arrays).  ``checkpoint_every`` N > 0 saves the partial sums to
    ``state_path`` every N batches; a run that finds a matching state file resumes after the
    batches it records.  ``device``: where the pass runs (None: CUDA when visible, else the
    CPU); batches are pinned for it when it is a GPU.  ``distributed`` (default ``world > 1``):
    all-reduce across the initialized process group, also with one rank.
    """
    from sn_deploy.data import Recipe, batches, load_recipe, open_source

    device = resolve_device(device)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    b, k = batch_size or rec.batch_size, num_batches or rec.num_batches
    if checkpoint_every < 0:
        raise InputError("--checkpoint-every must be >= 0 (0: no partial saves)")
    source = open_source(data, preprocess=rec.preprocess)
    resume, done = None, 0
    if checkpoint_every > 0:
        if state_path is None:
            raise InputError("--checkpoint-every needs a state file path")
        fingerprint = {"weights": model_fingerprint(model), "data": str(Path(data).resolve()),
                       "data_size": len(source), "batch_size": b, "num_batches": k,
                       "order": order, "seed": seed, "precise_bn": precise_bn,
                       "rank": rank, "world": world}
        resume = ResumeState.open(Path(state_path), checkpoint_every, fingerprint)
        done = resume.done
    # this rank's i-th batch is batch i·world + rank of the plan; skip the ones already done
    keep = lambda i: i % world == rank and i // world >= done  # noqa: E731
    local = len(range(rank, k, world))
    planned = batches(source, b, k, order=order, seed=seed, keep=keep, workers=workers,
                      pin_memory=device.type == "cuda")
    result = calibrate_batch_average(
        model, planned, local, precise_bn=precise_bn, progress=progress,
        distributed=world > 1 if distributed is None else distributed, resume=resume,
        device=device)
    result.num_batches = k
    result.resumed_from = done
    return result


def _progress(it, total: int, enabled: bool, done: int = 0):
    """A progress bar with ETA and throughput (images/s) over this run's batches."""
    if not enabled:
        yield from it
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("batches", total=total, completed=done, rate="")
        images, start = 0, time.perf_counter()
        for item in it:
            yield item
            images += int(item.shape[0])
            rate = images / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.0f} images/s")
