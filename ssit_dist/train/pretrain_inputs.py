"""What a pretraining run reads, checked before any engine is built: the batch layout, the filled DeepSpeed
config, the shards and their statistics. Every rank runs `check_inputs` first (train/pretrain.py), and
`ssit-dist pretrain` runs it once before starting any rank, which is why it lives apart from the trainer:
it imports no model or compiler (DeepSpeed only for its own check of the ZeRO section), and the launcher
answers a wrong field at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssit_dist.config import ConfigError, PretrainConfig, batch_layout, deepspeed_config
from ssit_dist.data.index import read_index
from ssit_dist.data.loading.labelled import SplitSource
from ssit_dist.data.loading.sources import ShardSet, is_pattern, open_shards


@dataclass(frozen=True)
class RunInputs:
    """What a run reads, checked: the batch layout, the filled DeepSpeed config, the shards, their mean/std."""

    micro: int
    accumulation: int
    ds_config: dict
    shards: ShardSet
    mean: list[float]
    std: list[float]
    held_out: ShardSet | None  # the view-retrieval photographs, where retrieval.shards names them
    steps_per_epoch: int

    @property
    def batches_per_rank(self) -> int:
        """Micro batches each rank reads per epoch."""
        return self.steps_per_epoch * self.accumulation


def check_inputs(cfg: PretrainConfig, world: int) -> RunInputs:
    """Everything a run reads that a wrong field breaks, checked before any engine is built, so that a
    mistake stops the run at once with a ConfigError or ShardIndexError naming the field, file or value.
    Needs no process group: every rank runs it on its own (and the tests, in one process)."""
    micro, accumulation = batch_layout(cfg.global_batch, world, cfg.micro_batch)
    ds_config = deepspeed_config(cfg.ds_config, cfg, world)
    shards = open_shards(cfg.data.shards, cfg.data.split)
    mean, std = cfg.data.mean or shards.mean, cfg.data.std or shards.std
    if mean is None or std is None:
        raise ConfigError(
            "data.mean / data.std: the shards in data.shards have no _info.json beside them; "
            "set both (RGB in [0, 1], as `ssit-dist shard` computed for them)"
        )
    shards.check_counted()
    if cfg.data.augment_on == "gpu":
        _check_one_size(cfg.data.shards)
    held_out = None
    if cfg.retrieval.shards is not None:
        source = SplitSource.parse(cfg.retrieval.shards, "train")
        held_out = open_shards([source.folder], source.split)
    steps_per_epoch = cfg.steps_per_epoch or max(shards.num_samples // cfg.global_batch, 1)  # type: ignore[operator]
    return RunInputs(micro, accumulation, ds_config, shards, list(mean), list(std), held_out, steps_per_epoch)


def _check_one_size(sources: list[str]) -> None:
    """data.augment_on=gpu decodes each batch as one tensor: the shards' photographs must share one size.
    Shards packed from photographs smaller than `--size` keep their own (packing/shard.py); their index
    says so, and the run stops here rather than at the first batch that mixes two sizes."""
    sides: dict[str, tuple[int, int]] = {}
    for source in sources:
        if not is_pattern(source):  # a pattern has no index of sizes; a mixed batch names them
            sizes = read_index(Path(source)).photograph_sizes
            if sizes is not None:
                sides[source] = (sizes["packed_side"]["min"], sizes["packed_side"]["max"])
    seen = sorted({side for pair in sides.values() for side in pair})
    if len(seen) > 1:
        where = "; ".join(f"{source}: {low}-{high} px" for source, (low, high) in sides.items())
        raise ConfigError(
            f"data.augment_on=gpu decodes each batch as one tensor, of one size, but the shards hold photographs "
            f"packed at {seen[0]} to {seen[-1]} px ({where}): pack them again with `ssit-dist shard ... --size "
            f"{seen[0]}`, or set data.augment_on=cpu"
        )
