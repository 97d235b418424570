"""torch.distributed set-up for multi-process calibration (launched by ``torchrun``)."""
from __future__ import annotations

import os

from sn_deploy.errors import InputError


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world size).

    gloo on CPU, nccl when this process has a CUDA device.
    """
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InputError(f"--distributed needs a torchrun launch ({', '.join(missing)} not set): "
                         "torchrun --nproc_per_node=N $(which sn-calibrate) ... --distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
