"""Data-parallel training on PyTorch's own stack: `torchrun` starts the processes, DDP all-reduces gradients.

Nothing here starts processes or invents a protocol. Under `torchrun --nproc_per_node N` (or `accelerate launch`,
which runs torchrun underneath) every process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in
its environment; `setup()` reads them and calls `torch.distributed.init_process_group` ("env://" rendezvous,
https://pytorch.org/docs/stable/elastic/run.html). A plain `carrara train` has WORLD_SIZE unset and never
touches torch.distributed.

How a global batch of B examples is shared (see Trainer.fit): every rank draws the same B indices and the same
random numbers from the step's generator, and computes the loss on its own contiguous B / world_size rows. DDP
averages the gradients over ranks (https://pytorch.org/docs/stable/notes/ddp.html), and the mean of equal-sized
per-rank means is the mean over B: the update equals one process with batch B, up to float summation order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from carrara.errors import CarraraError


@dataclass(frozen=True)
class Context:
    """Where this process sits: rank among world_size processes, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Only the main process (rank 0) writes files: checkpoints, logs, metrics, samples."""
        return self.rank == 0


def is_main_process() -> bool:
    """True unless a launcher says this is a rank other than 0 (usable before setup(), e.g. for warnings)."""
    return os.environ.get("RANK", "0") == "0"


def setup() -> Context:
    """Join the process group the launcher described (gloo on CPU, nccl on GPUs); idempotent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise CarraraError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        try:
            dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
        except (RuntimeError, ValueError) as e:
            raise CarraraError(f"cannot join the process group (rank {rank} of {world_size}): "
                               f"{str(e).splitlines()[0]}") from None
    return Context(rank, world_size, device)


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group (torch warns at exit if it is still open).

    After a successful run every rank first waits for the others, so rank 0 (which hosts the rendezvous store)
    does not exit while another rank still talks to it; after an error it must not wait (the others may never
    arrive), and the launcher stops the remaining ranks when this one exits non-zero.
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    """Wait for every rank (e.g. until all have read a checkpoint that rank 0 may rewrite next)."""
    if ctx.world_size > 1:
        dist.barrier()


def all_mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself in one process); every rank gets the same result."""
    if ctx.world_size == 1:
        return value
    value = value.clone().to(ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return (value / ctx.world_size).cpu()


def rank_rows(batch_size: int, ctx: Context, grad_accum: int) -> list[slice]:
    """This rank's rows of a global batch, cut into `grad_accum` equal micro-batches.

    Rank r owns rows [r·B/W, (r+1)·B/W); equal sizes are what make the average of per-rank, per-micro-batch
    means equal the mean over the whole batch.
    """
    parts = ctx.world_size * grad_accum
    if grad_accum < 1 or batch_size % parts:
        raise CarraraError(f"batch size {batch_size} must be divisible by processes × grad_accum = "
                           f"{ctx.world_size} × {grad_accum}")
    per = batch_size // parts
    start = ctx.rank * batch_size // ctx.world_size
    return [slice(start + k * per, start + (k + 1) * per) for k in range(grad_accum)]


class LossModule(torch.nn.Module):
    """`loss_fn(model, idx, gen, rows)` as a module, so DDP sees every use of the model inside its forward.

    DDP prepares its gradient hooks in `forward`; our stages call model methods (`encode`, `decode`) rather
    than `model(x)`, so the whole loss is wrapped, as PyTorch Lightning wraps its training_step.
    """

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        return self.loss_fn(self.model, idx, gen, rows)


def wrap(model: torch.nn.Module, loss_fn, ctx: Context):
    """A callable (idx, gen, rows) -> loss: DDP around LossModule when distributed, else the loss itself."""
    if ctx.world_size == 1:
        return lambda idx, gen, rows: loss_fn(model, idx, gen, rows)

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(LossModule(model, loss_fn), device_ids=device_ids)  # broadcasts rank 0's weights at construction
