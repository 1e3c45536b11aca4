"""Sharding over processes: ``torchrun`` or ``accelerate launch`` runs the same command on each.

Every process loads the model and runs the same steps; only the passes over the training set are
split. :func:`diffattr.losses.loss_matrix` scores this process's contiguous block of rows and
gathers every block, so each process ends with the whole matrix, and — the noise being keyed by
image id — the same matrix one process computes (to float rounding of the batches). A perturbed
copy is made on every process and rank 0's parameters are broadcast, so all score the same copy.

Only rank 0 writes files (:func:`diffattr.files.atomic_write` asks :func:`is_main`), and every
write is a collective step: the other processes wait for it to land. All processes therefore see
the same run directory at the same point of the run and take the same branches (resume, reuse).

Outside a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def setup() -> None:
    """Joins the launcher's process group (gloo on CPUs, NCCL on GPUs, one GPU per process)
    through accelerate; nothing when not launched on several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def is_initialized() -> bool:
    """Whether a process group is up (never, until torch is imported: files can be written without it)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def _torch():
    import torch

    return torch


def world_size() -> int:
    return _torch().distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return _torch().distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and shows progress bars (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        _torch().distributed.barrier()


def block(num_rows: int) -> range:
    """This process's contiguous rows of ``range(num_rows)`` (ranks in order; sizes differ by ≤ 1)."""
    size, index = world_size(), rank()
    return range(index * num_rows // size, (index + 1) * num_rows // size)


def _communication_device() -> torch.device:
    torch = _torch()
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_blocks(local: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Every process's :func:`block` of rows, concatenated in rank order: ``(num_rows, ...)`` on
    every process, on ``local``'s device."""
    if not is_initialized():
        return local
    torch = _torch()
    size = world_size()
    longest = -(-num_rows // size)
    device = _communication_device()
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(parts, padded)
    lengths = [(r + 1) * num_rows // size - r * num_rows // size for r in range(size)]
    return torch.cat([part[:length] for part, length in zip(parts, lengths)]).to(local.device)


def _in_place(tensor: torch.Tensor, collective) -> None:
    """Runs ``collective`` on ``tensor`` (moved to the backend's device and back)."""
    if not is_initialized():
        return
    data = tensor.to(_communication_device())
    collective(data)
    if data is not tensor:
        tensor.copy_(data)


def all_sum(tensor: torch.Tensor) -> None:
    """The sum over processes of ``tensor``, in place, on every process."""
    _in_place(tensor, lambda data: _torch().distributed.all_reduce(data))


def broadcast(tensor: torch.Tensor) -> None:
    """Rank 0's values of ``tensor``, in place, on every process."""
    _in_place(tensor, lambda data: _torch().distributed.broadcast(data, src=0))


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (the same perturbed copy everywhere)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        broadcast(tensor.data)
