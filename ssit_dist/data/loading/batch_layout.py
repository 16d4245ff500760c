"""How a global batch splits over the ranks: the micro batch each rank loads per forward and the
gradient accumulation steps, with micro * accumulation * world = global. The loader's epoch plan and
the training engine both start from it (data-plan's dry run and pretraining agree by construction)."""

from __future__ import annotations

from ssit_dist.configclass import ConfigError


def batch_layout(global_batch: int, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) with micro * accumulation * world = global."""
    if global_batch % world:
        raise ConfigError(f"global_batch {global_batch} is not divisible by the world size {world}")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"micro_batch {micro} does not divide the per-rank batch {per_rank} "
            f"(global_batch {global_batch} over {world} ranks)"
        )
    if micro < 2:
        raise ConfigError(f"micro_batch {micro}: BatchNorm in the projector needs at least 2 samples per rank")
    return micro, per_rank // micro
