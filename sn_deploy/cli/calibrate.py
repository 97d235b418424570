"""``sn-calibrate``: batch-average the BN-branch statistics of a checkpoint's SN layers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sn_deploy.cli.common import device_option, run_app

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def calibrate(
    checkpoint: Path = typer.Argument(..., help="input checkpoint (.pth)"),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="registered name or package.module:factory; default: inferred from "
                             "the checkpoint's keys and shapes"),
    data: str = typer.Option(..., "--data", help=".npy/.npz array (N,C,H,W) or an image folder"),
    output: Path = typer.Option(..., "--output", "-o", help="calibrated checkpoint to write"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="B (recipe default 32)"),
    num_batches: Optional[int] = typer.Option(None, "--num-batches",
                                              help="K (recipe default 200, as the official code)"),
    order: str = typer.Option("random", "--order", help="sequential | random"),
    seed: int = typer.Option(0, "--seed", help="seed of the random batch order"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="YAML recipe, see calibration/"),
    precise_bn: bool = typer.Option(False, "--precise-bn",
                                    help="also batch-average plain BatchNorm layers"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                      help="allow a pickled nn.Module (runs code from the file)"),
    report: Optional[Path] = typer.Option(None, "--report", help="per-layer JSON report"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    distributed: bool = typer.Option(False, "--distributed",
                                     help="one rank of a torchrun job: batches split across ranks, "
                                          "sums all-reduced, rank 0 writes"),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="DataLoader worker processes (default: up to 4 "
                                               "for image folders, 0 for arrays)"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every",
                                         help="save partial sums every N batches to "
                                              "OUTPUT.calib-state; a rerun resumes from it"),
    device: Optional[str] = typer.Option(None, "--device",
                                         help="cpu, cuda, cuda:N or mps (default: cuda when "
                                              "visible, else cpu; under torchrun each rank "
                                              "takes cuda:LOCAL_RANK)"),
    adopt: bool = typer.Option(True, "--adopt/--no-adopt",
                               help="adopt foreign SN layers (official classes, your copies) as "
                                    "sn_deploy layers (default on)"),
) -> None:
    from sn_deploy.distributed import init_from_env, shutdown

    where = device_option(device, distributed)
    rank, world = init_from_env(where) if distributed else (0, 1)
    try:
        _calibrate(checkpoint, arch, data, output, batch_size, num_batches, order, seed, recipe,
                   precise_bn, trust_pickle, report, quiet or rank != 0, rank, world, workers,
                   checkpoint_every, adopt, device=where, distributed=distributed)
    finally:
        if distributed:
            shutdown()


def state_path(output: Path, rank: int, world: int) -> Path:
    """Where ``--checkpoint-every`` keeps a run's partial sums (one file per rank)."""
    suffix = f".rank{rank}" if world > 1 else ""
    return output.with_name(output.name + ".calib-state" + suffix)


def _calibrate(checkpoint, arch, data, output, batch_size, num_batches, order, seed, recipe,
               precise_bn, trust_pickle, report, quiet, rank, world, workers,
               checkpoint_every, adopt=True, device=None, distributed=False) -> None:
    from sn_deploy.atomic import atomic_write
    from sn_deploy.calibrate import calibrate_from_data
    from sn_deploy.checkpoint import load_checkpoint, save_checkpoint_like
    from sn_deploy.data import load_recipe
    from sn_deploy.pipeline import check_writable_dir

    rec = load_recipe(recipe)  # a bad recipe is reported before any slow work
    check_writable_dir(output.parent)
    if report is not None:
        check_writable_dir(report.parent)
    loaded = load_checkpoint(checkpoint, arch, trust_pickle=trust_pickle, adopt=adopt)
    if rank == 0:
        for line in loaded.notes():
            typer.echo(line)
    state = state_path(output, rank, world)
    result = calibrate_from_data(loaded.model, data, recipe=rec, batch_size=batch_size,
                                 num_batches=num_batches, order=order, seed=seed,
                                 precise_bn=precise_bn, progress=not quiet, rank=rank, world=world,
                                 workers=workers, state_path=state,
                                 checkpoint_every=checkpoint_every, device=device,
                                 distributed=distributed)
    k = result.num_batches
    b = result.num_samples // k
    if result.resumed_from and rank == 0:
        typer.echo(f"resumed after {result.resumed_from} batch(es) saved in {state}")
    if rank == 0:
        payload = result.to_json()
        if loaded.adoption is not None:
            payload["adoption"] = loaded.adoption.to_json()
        report_text = json.dumps(payload, indent=2)  # before any file is written
        save_checkpoint_like(loaded, loaded.model, output)
        if report is not None:
            atomic_write(report, report_text)
        over = f"{world} process{'es' if world > 1 else ''}"
        if distributed:
            import torch.distributed as dist

            over += f" ({dist.get_backend()})"
        typer.echo(f"calibrated {len(result.layers)} layers on {k} batches of {b} over {over} "
                   f"on {result.device} "
                   f"({result.images_per_second:.0f} images/s); wrote {output}")
    if world > 1:  # every rank's state stays until rank 0 has written the result
        import torch.distributed as dist

        dist.barrier()
    state.unlink(missing_ok=True)


main = run_app(app)
