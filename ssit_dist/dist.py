"""Distributed plumbing: the process group, and every collective the project calls itself.

The rule that keeps multi-GPU runs alive: a collective runs on the engine's device. Under NCCL a CPU
tensor in a collective raises, so every helper here takes the device and builds its tensors on it; no
other module calls torch.distributed (or Accelerate's reduce/gather) directly (tests/test_collectives.py
reads the source and enforces it). The process group is created with a backend per device type
(`cpu:gloo,cuda:nccl` on GPUs), so that even a CPU tensor that slips through cannot crash it, and with a
timeout, so that a rank that never arrives ends the job with an error instead of a silent stall.

Where a process group exists the collectives run even at world size 1: a one-GPU job is the only GPU job
a test can run, and it must make the same NCCL calls as eight GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from ssit_dist.placement import PlacementError, adopt_srun_environment, bind_gpu
from ssit_dist.ports import free_port

T = TypeVar("T")
log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """Work that one rank did for all (a checkpoint pointer, a config file, a report) failed there; every
    rank raises this, so none waits forever in the next collective."""


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def init_process_group(timeout_s: float) -> torch.device:
    """The process group from the launcher's environment (deepspeed, torchrun, srun, accelerate, or
    none: then one process), with `timeout_s` on every collective. Returns this rank's device."""
    adopt_srun_environment()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    device = bind_gpu()
    if not is_distributed():
        # NCCL for CUDA tensors, gloo for any CPU tensor. device_id binds the NCCL communicator to this
        # rank's GPU up front (torch then knows the device of object collectives and barriers); DeepSpeed
        # leaves it out at world size 1, where it would make every later new_group split a communicator.
        kwargs: dict[str, Any] = {}
        if device.type == "cuda" and int(os.environ["WORLD_SIZE"]) > 1:
            kwargs["device_id"] = device
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            torch_dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        except torch_dist.DistNetworkError as error:
            if "EADDRINUSE" not in str(error):
                raise
            raise PlacementError(_port_in_use()) from error
    return device


def _port_in_use() -> str:
    """What to do when rank 0 cannot listen on MASTER_PORT: another run (or program) holds it."""
    port, host, free = os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"], free_port()
    return (
        f"port {port} on {host} (MASTER_PORT) is in use, by another run on this machine or another program: "
        f"relaunch with a free one, e.g. MASTER_PORT={free} (the deepspeed and torchrun launchers: "
        f"--master_port {free}; accelerate launch: --main_process_port {free})"
    )


def shutdown() -> None:
    """Tear the process group down, then give gloo's threads a moment before the interpreter exits.
    A gloo thread frees each finished collective's tensors after the caller has its result, and
    freeing a tensor Python knows takes the GIL; if the interpreter is finalizing by then, the thread
    is made to exit inside C++ and the process aborts ("terminate called without an active
    exception", SIGABRT, seen in about one 2-process fine-tuning exit in three). Sleeping releases
    the GIL: 0.2 s is orders of magnitude more than a release takes."""
    if is_distributed():
        torch_dist.destroy_process_group()
        time.sleep(0.2)


def release_shared_memory_names(device: torch.device) -> None:
    """DeepSpeed's CPU collectives give each rank a buffer in /dev/shm (about 70 MB, named
    deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK) and never remove the name, so every CPU run leaks one
    per rank until the machine's memory runs out. Every rank maps every buffer before its init returns;
    once all ranks are past it (the barrier), each removes its own name: the mappings live on until the
    processes exit, and nothing is left behind however they exit. Collective; call it right after
    `deepspeed.init_distributed`."""
    if device.type != "cpu" or not is_distributed():
        return
    barrier(device)
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{torch_dist.get_rank()}").unlink(
        missing_ok=True
    )


def barrier(device: torch.device) -> None:
    """Every rank waits for every other, through an all-reduce on `device` (a bare barrier guesses it)."""
    if is_distributed():
        torch_dist.all_reduce(torch.zeros(1, device=device))


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is true on any rank, on every rank: the way all ranks stop together
    (several flags in one all-reduce)."""
    if not is_distributed():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def max_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of `tensor` (on the engine's device) over every rank, without reading it
    on the host: flags agreed on by every rank at the cost of one all-reduce and no device sync."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def sum_over_ranks(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` summed element-wise over every rank, through an all-reduce on `device` (integer counts stay
    exact); returned where `tensor` lives."""
    if not is_distributed():
        return tensor
    on_device = tensor.to(device)
    torch_dist.all_reduce(on_device)
    return on_device.to(tensor.device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank."""
    return any_ranks([flag], device)[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank number over every rank."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.item() / world_size()


def broadcast_from_zero(obj: T, device: torch.device) -> T:
    """Rank 0's `obj` (anything picklable) on every rank: one decision, taken once."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def gather_objects(obj: T, device: torch.device) -> list[T]:
    """`obj` of every rank, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    # The object travels as a byte tensor on the current device: make that `device`.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        torch_dist.all_gather_object(out, obj)
    return out


def join_skipped_barrier() -> None:
    """torch.distributed.barrier(), for one case: a rank whose DeepSpeed `save_checkpoint` raised in its
    writes skipped the barrier that call ends with, where the other ranks wait; it joins them there,
    so that every rank's next collective is the same one. (On CUDA the group was made with device_id,
    so the barrier knows its device.)"""
    if is_distributed():
        torch_dist.barrier()


def problems_on_ranks(problem: str | None, device: torch.device) -> list[str]:
    """Collective. Every rank's problem (None: none), each as "rank R on HOST: problem": where ranks see
    different files (node-local disks, a stale NFS view, a full disk on one node), the message must say
    which rank and which host. Empty when no rank had one."""
    seen = gather_objects((socket.gethostname(), problem), device)
    return [f"rank {r} on {host}: {p}" for r, (host, p) in enumerate(seen) if p]


def on_rank_zero(work: Callable[[], T], device: torch.device, what: str) -> T | None:
    """Run `work` on rank 0 only, then agree on its success: if it raised (disk full, no permission, a
    file where a folder must go), every rank raises RankFailure naming `what` and the error, instead
    of the others waiting in their next collective until the timeout."""
    result, error = None, None
    if rank() == 0:
        try:
            result = work()
        except Exception as e:  # whatever it was, the other ranks must hear of it
            error = e
    if any_rank(error is not None, device):
        detail = (
            f"{error.strerror or error}: {error.filename}" if isinstance(error, OSError) and error.filename else error
        )
        raise RankFailure(f"{what} failed on rank 0: {detail or 'see the log of rank 0'}") from error
    return result


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (on the engine's device) from every rank along dim 0, in rank order; no
    gradient flows back."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _SumOverRanks(torch.autograd.Function):
    """Every rank's output is the sum of every rank's input, so the gradient of an input is the sum of
    every rank's gradient of that output: an all-reduce both ways. (torch's own differentiable
    `torch.distributed.nn.functional.all_reduce` is deprecated and warns at every call.)"""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)  # collectives need dense, row-major memory
        torch_dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        torch_dist.all_reduce(total)
        return total


def sum_over_ranks_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` (on its module's device) over every rank, with the gradient summed back."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _SumOverRanks.apply(tensor)


def full_fp32_parameters(*modules: nn.Module) -> list[torch.Tensor]:
    """Every parameter of `modules`, whole and in fp32, in `parameters()` order, module after module.

    Plain modules give their own tensors (cast where not fp32). Under DeepSpeed the full fp32 master
    copy is assembled from the optimizer's partitions with one collective for all parameters, not one
    per parameter tensor (about 150 for ViT-S): under ZeRO 1/2 (and DeepSpeed's bf16 optimizer) each
    rank writes the master fragments it owns into a zeroed flat buffer and one all-reduce sums them
    (exact: every element has one owner, the other ranks add zeros); under ZeRO-3 the ranks' equal-sized
    partitions are concatenated and all-gathered once. Collective: every rank must call it.
    """
    params = [p for module in modules for p in module.parameters()]
    full: dict[int, torch.Tensor] = {}
    mapped = [p for p in params if hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id")]
    if mapped:
        full.update(zip(map(id, mapped), _gather_fragments(mapped), strict=True))
    partitioned = [p for p in params if hasattr(p, "ds_id") and p.requires_grad]
    if partitioned:
        full.update(zip(map(id, partitioned), _gather_partitions(partitioned), strict=True))
    for p in params:
        if id(p) in full:
            continue
        if hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: no fp32 master, gather its shards
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full[id(p)] = p.detach().float().clone()
        else:
            full[id(p)] = p.detach() if p.dtype == torch.float32 else p.detach().float()
    return [full[id(p)] for p in params]


@dataclass(frozen=True)
class FlatMaster:
    """Where DeepSpeed keeps the fp32 master of some parameters as flat partitions, one per (sub)group on
    each data-parallel rank, and how a whole parameter lies across the ranks' partitions:

    - ZeRO 1/2 (its ZeRO optimizer and its bf16 optimizer): a group's parameters lie one after another
      in one flat buffer cut into `world` equal partitions, and rank r holds the r-th. `places` give each
      parameter's offset into the whole buffer; `pieces` is None.
    - ZeRO-3: each parameter is cut into `world` equal pieces (the last one padded), and rank r's
      partition of a sub group is the r-th piece of each of its parameters, one after another. `places`
      give the offset of each parameter's piece in every rank's partition, `pieces` the piece sizes.

    Only the groups that hold the parameters asked for are listed: a group of other parameters (the
    predictor's) is never gathered for them."""

    partitions: list[torch.Tensor]  # per group, this rank's fp32 master partition (live: the optimizer's)
    group: Any  # the data-parallel process group
    rank: int  # this rank's partition
    world: int  # partitions per group
    places: list[tuple[int, int]]  # per parameter asked for: (group, offset), as the class says
    pieces: list[int] | None = None  # ZeRO-3: per parameter, the piece each rank holds

    def same_layout(self, other: FlatMaster) -> bool:
        """Whether `other` lays the same parameters out the same way (partitions built for one fit the other)."""
        mine, theirs = (
            (self.places, self.pieces, self.rank, self.world),
            (other.places, other.pieces, other.rank, other.world),
        )
        return mine == theirs

    def scatter(self, tensors: list[torch.Tensor], parts: list[torch.Tensor]) -> None:
        """Writes this rank's share of each whole tensor (one per parameter, in `places` order) into
        `parts` (laid out as `partitions`); positions no parameter covers (padding) keep their values."""
        for i, (tensor, (group, offset)) in enumerate(zip(tensors, self.places, strict=True)):
            flat, part = tensor.reshape(-1), parts[group]
            if self.pieces is None:
                start = self.rank * part.numel()
                lo, hi = max(start, offset), min(start + part.numel(), offset + flat.numel())
                if lo < hi:
                    part[lo - start : hi - start].copy_(flat[lo - offset : hi - offset])
            else:
                first = self.rank * self.pieces[i]
                size = max(0, min(self.pieces[i], flat.numel() - first))
                part[offset : offset + size].copy_(flat[first : first + size])

    def copy_into(self, wholes: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """Copies each parameter out of its group's whole flat buffer (`gather_partitions`: every rank's
        partition, rank after rank) into `targets` (contiguous, one per parameter in `places` order),
        casting to their dtype; no intermediate tensor."""
        for i, (target, (group, offset)) in enumerate(zip(targets, self.places, strict=True)):
            flat = target.view(-1)
            if self.pieces is None:
                flat.copy_(wholes[group][offset : offset + flat.numel()])
                continue
            # Row r of the (world, partition) table holds rank r's pieces: the parameter is its column
            # block read row by row, the last row cut where the padding starts.
            piece = self.pieces[i]
            if piece == 0:
                continue
            block = wholes[group].view(self.world, -1)[:, offset : offset + piece]
            rows, rest = divmod(flat.numel(), piece)
            flat[: rows * piece].view(rows, piece).copy_(block[:rows])
            if rest:
                flat[rows * piece :].copy_(block[rows, :rest])


def flat_master(optimizer: Any, params: list[nn.Parameter]) -> FlatMaster | None:
    """The flat fp32 master partitions behind `params` where `optimizer` is DeepSpeed's ZeRO 1/2, bf16 or
    ZeRO-3 optimizer; None for anything else (ZeRO-0, expert parallelism, an optimizer swapped to NVMe),
    where the caller falls back to `full_fp32_parameters`."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(optimizer, "grad_position"):
        return _zero3_master(optimizer, params)
    flats = getattr(optimizer, "bit16_groups_flat", None)
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(optimizer, "bf16_groups_flat", None)
        partitions = getattr(optimizer, "fp32_groups_flat_partition", None)
    groups = getattr(optimizer, "real_dp_process_group", None)
    if not flats or partitions is None or groups is None or any(g is not groups[0] for g in groups):
        return None
    world = torch_dist.get_world_size(group=groups[0]) if is_distributed() else 1
    if any(p.numel() * world != f.numel() for p, f in zip(partitions, flats, strict=True)):
        return None
    places = []
    for p in params:
        found = [
            (g, (p.data_ptr() - f.data_ptr()) // f.element_size())
            for g, f in enumerate(flats)
            if f.data_ptr() <= p.data_ptr() < f.data_ptr() + f.numel() * f.element_size()
        ]
        if len(found) != 1:
            return None
        places.append(found[0])
    used = sorted({g for g, _ in places})
    index = {g: i for i, g in enumerate(used)}
    rank_in_group = torch_dist.get_rank(group=groups[0]) if is_distributed() else 0
    return FlatMaster(
        [partitions[g] for g in used], groups[0], rank_in_group, world, [(index[g], o) for g, o in places]
    )


def _zero3_master(optimizer: Any, params: list[nn.Parameter]) -> FlatMaster | None:
    """ZeRO-3: the optimizer's fp32 sub-group partitions, read directly (no per-parameter accessor: on a
    GPU DeepSpeed's `_get_fp32_opt_state_partition` synchronises a stream at every call). They were last
    written by the optimizer step on the compute stream, which orders every later read after it."""
    if not params or any(not hasattr(p, "ds_id") or not p.requires_grad for p in params):
        return None  # a frozen parameter has no fp32 master
    positions = [optimizer.grad_position.get(optimizer.get_param_id(p)) for p in params]
    if any(position is None for position in positions):
        return None
    used = sorted({group for group, _, _ in positions})
    if any(optimizer._swappable_optimizer_subgroup(g) for g in used):
        return None  # swapped out to NVMe between steps: only DeepSpeed's accessor brings it back
    group = optimizer._get_param_partition_group(params[0])
    if any(optimizer._get_param_partition_group(p) is not group for p in params):
        return None
    world = torch_dist.get_world_size(group=group) if is_distributed() else 1
    rank_in_group = torch_dist.get_rank(group=group) if is_distributed() else 0
    index = {g: i for i, g in enumerate(used)}
    return FlatMaster(
        [optimizer.fp32_partitioned_groups_flat[g] for g in used],
        group,
        rank_in_group,
        world,
        [(index[g], offset) for g, offset, _ in positions],
        [piece for _, _, piece in positions],
    )


def gather_partitions(
    master: FlatMaster, parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Per group, the whole flat buffer from every rank's `parts` (laid out as `master.partitions`),
    rank after rank, in `dtype` on `device`: one all-gather per group."""
    out = []
    for part in parts:
        mine = part.to(device, dtype)
        whole = torch.empty(master.world * mine.numel(), dtype=dtype, device=device)
        if is_distributed():
            torch_dist.all_gather_into_tensor(whole, mine, group=master.group)
        else:
            whole.copy_(mine)
        out.append(whole)
    return out


def _gather_fragments(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """ZeRO 1/2: the fp32 master of `params` from the fragments each rank owns, in one all-reduce."""
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    offset = 0
    for p, size in zip(params, sizes, strict=True):
        mapping = p._hp_mapping  # type: ignore[attr-defined]
        if mapping is not None:  # None: no fragment of this parameter lives on this rank
            address = mapping.lp_fragment_address
            flat.narrow(0, offset + address.start, address.numel).copy_(mapping.get_hp_fragment())
        offset += size
    group = params[0]._dp_group  # type: ignore[attr-defined]
    if any(p._dp_group is not group for p in params):  # type: ignore[attr-defined]
        raise NotImplementedError("parameters in several data-parallel groups (expert parallelism)")
    if is_distributed():
        torch_dist.all_reduce(flat, group=group)
    return [t.view_as(p) for t, p in zip(flat.split(sizes), params, strict=True)]


def _gather_partitions(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """ZeRO-3: the fp32 master of `params` from every rank's partitions, in one all-gather. Each rank
    holds an equal-sized (padded) slice of each parameter; row r of the gathered table is rank r's."""
    optimizer = params[0]._z3_optimizer  # type: ignore[attr-defined]
    device = params[0].ds_tensor.device  # type: ignore[attr-defined]
    # DeepSpeed's own accessor of a parameter's fp32 partition (what its get_full_hp_param gathers).
    local = [optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)[0].to(device) for p in params]
    sizes = [t.numel() for t in local]
    group = optimizer._get_param_partition_group(params[0])
    world = torch_dist.get_world_size(group=group) if is_distributed() else 1
    table = torch.empty(world, sum(sizes), dtype=torch.float32, device=device)
    if is_distributed():
        torch_dist.all_gather_into_tensor(table.view(-1), torch.cat(local), group=group)
    else:
        table[0] = torch.cat(local)
    out, offset = [], 0
    for p, size in zip(params, sizes, strict=True):
        whole = table[:, offset : offset + size].reshape(-1)  # rank 0's slice, rank 1's, ...
        out.append(whole[: p.ds_numel].view(p.ds_shape))  # type: ignore[attr-defined]
        offset += size
    return out
