"""Process group setup for torchrun (nccl on GPU, gloo on CPU) and the DDP wrapping GANs need.

``python train_ddp.py`` (no torchrun environment) runs one process with no process group.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK or the CPU, per --device; a ConfigError where the GPU asked for is not there."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        why = "finds no GPU" if torch.backends.cuda.is_built() else "was built without CUDA"
        raise ConfigError(f"--device cuda: CUDA is not available (this PyTorch {torch.__version__} {why}); "
                          "use --device cpu")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} of this machine has no GPU ({torch.cuda.device_count()} "
                              "visible): start at most that many processes per machine (--nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join torchrun's process group if launched by it (RANK/WORLD_SIZE set), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _per_attempt_store(world_size)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _per_attempt_store(world_size: int):
    """torchrun's agent store when torchrun shares it, under a prefix naming the restart attempt.

    That store outlives worker restarts (--max-restarts), and torch's env:// rendezvous adds no
    per-attempt prefix, so restarted gloo workers could read their dead peers' addresses and fail
    ("connectFullMesh ... Connection refused": seen 2 times in 3 on torch 2.13 here). None when
    not under a shared agent store (then rank 0 hosts a fresh store per attempt anyway).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"sagan_fast/attempt_{attempt}", store)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers_once(model: nn.Module, info: DistInfo) -> None:
    """Make every buffer (SN u and v, BN statistics) equal to rank 0's, once, at setup.

    Models are built under the same seed on every rank, so this is a safeguard; afterwards the
    buffers stay equal by construction (same weights after every averaged-gradient step, same
    power iteration) and DDP runs with broadcast_buffers=False.
    """
    if info.distributed:
        with torch.no_grad():
            for buf in model.buffers():
                dist.broadcast(buf, src=0)


def _as_param_strides(param: torch.Tensor):
    """A grad hook: a gradient laid out like ``param`` except for the strides of size-1 dims (a
    1x1 conv's weight gradient from channels_last activations: [C, 1, C, C] against [C, 1, 1, 1])
    is the same memory; give it the parameter's strides, no copy, so DDP's bucket views match
    (else: "Grad strides do not match bucket view strides" on every run)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == param.stride() or grad.shape != param.shape:
            return grad
        if all(g == p for g, p, n in zip(grad.stride(), param.stride(), grad.shape) if n > 1):
            return grad.as_strided(param.shape, param.stride())
        return grad
    return hook


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP that does not re-broadcast buffers at every forward: that rewrites buffers in place,
    which breaks SN's u when D runs before an earlier graph is backpropagated (docs/DESIGN.md, "How
    the spectral-norm update works").

    Newer torch spells it ``forward_sync_buffers=False`` (buffers still synced once at init, which
    we want) and deprecates ``broadcast_buffers``; torch 2.11 only knows ``broadcast_buffers``.
    """
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(_as_param_strides(p))
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def share_kernel_tuning(info: DistInfo) -> None:
    """Every rank takes rank 0's Triton launch settings (tuned per rank during the first step), so
    all ranks run the same kernels; nothing to do alone or when no Triton kernel ran."""
    import sys

    attention = sys.modules.get("sagan_fast.ops.triton.attention")
    if info.distributed and attention is not None:
        attention.broadcast_tuning()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] when alone)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
