"""SSiT pretraining with DeepSpeed: the training loop.

Per optimizer step: set lr / momentum / saliency weight from the fractional epoch, then run SSiT's
step (train/step.py: momentum update, keys from the salient patches, both losses, backward and step
through the DeepSpeed engine) over the step's micro batches. Checkpoints every
`checkpoint_every` steps, at the end, and when SIGTERM or SIGUSR1 arrives (SLURM's warning before the
time limit); a relaunch resumes from the latest complete checkpoint at the same schedule position and
data position.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ssit_dist.config import ConfigError, PretrainConfig, batch_layout, deepspeed_config, save_config
from ssit_dist.data.augment import PairAugment
from ssit_dist.data.index import ShardIndexError
from ssit_dist.data.sources import ShardSet, SourceError, open_shards, verify_shards
from ssit_dist.data.stream import PairStream, pair_loader
from ssit_dist.data.workers import PREEMPTION_SIGNALS, start_batches
from ssit_dist.dist import (
    RankFailure,
    any_rank,
    any_ranks,
    gather_objects,
    init_process_group,
    on_rank_zero,
    rank,
    shutdown,
    world_size,
)
from ssit_dist.models.batchnorm import convert_batchnorm
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.ssit import SSiT
from ssit_dist.train import checkpoint, schedule
from ssit_dist.train.report import Reporter
from ssit_dist.train.resume import ResumeError, ResumePlan, write_fingerprint
from ssit_dist.train.step import Batch, train_step

log = logging.getLogger("ssit_dist.pretrain")


class StopRequested(Exception):
    """SIGTERM / SIGUSR1 arrived: a checkpoint was saved and the run stops cleanly."""


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fingerprint(
    cfg: PretrainConfig,
    world: int,
    micro: int,
    accumulation: int,
    steps_per_epoch: int,
    shards: ShardSet,
    ds_config: dict,
) -> dict:
    """Everything a resume depends on (see train/resume.py)."""
    return {
        "world_size": world,
        "global_batch": cfg.global_batch,
        "micro_batch": micro,
        "gradient_accumulation": accumulation,
        "steps_per_epoch": steps_per_epoch,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "model": asdict(cfg.model),
        "ds_config": ds_config,
        "shards": [
            {"url": url, "samples": n, "bytes": size, "sha256": digest}
            for url, n, size, digest in zip(shards.paths, shards.lengths, shards.sizes, shards.sha256, strict=True)
        ],
    }


def build_and_restore(cfg: PretrainConfig, ds_config: dict, plan: ResumePlan, device: torch.device) -> tuple[Any, Any]:
    """Collective. The DeepSpeed engine of the online network and the fp32 momentum network, with the
    checkpoint `plan` names loaded into both (converted to the new world size first for a reshard)."""
    import deepspeed

    if plan.mode == "reshard":
        checkpoint.to_universal(Path(cfg.run_dir), plan.tag, device)  # type: ignore[arg-type]
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    torch.manual_seed(cfg.seed)
    model = SSiT(cfg.model)
    if world_size() > 1 or device.type == "cuda":  # on CUDA always: the same NCCL path at any world size
        convert_batchnorm(model, device.type)
    engine, _, _, _ = deepspeed.initialize(
        model=model.online, model_parameters=model.online.parameters(), config=ds_config
    )
    momentum_net = model.momentum.to(device)
    if plan.tag is not None:
        state = checkpoint.load(engine, Path(cfg.run_dir), plan, device)
        momentum_net.load_state_dict(state["momentum"])
        if int(state["step"]) != plan.step:
            raise ResumeError(
                f"checkpoint {plan.tag} in {cfg.run_dir} holds step {state['step']}, its "
                f"{checkpoint.META} says {plan.step}; the folder was modified by hand"
            )
    return engine, momentum_net


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining as `cfg` says; returns the run folder."""
    import deepspeed

    device = init_process_group(cfg.dist_timeout_s)
    deepspeed.init_distributed(dist_backend=torch_dist.get_backend(), timeout=timedelta(seconds=cfg.dist_timeout_s))
    # Installed first: a signal during start-up (SLURM preempting a job that is still loading) means
    # exit cleanly at the first point where every rank can agree, without training.
    stop = {"requested": False}
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, lambda *_: stop.update(requested=True))
    run_dir = Path(cfg.run_dir)
    world = world_size()
    micro, accumulation = batch_layout(cfg.global_batch, world, cfg.micro_batch)
    ds_config = deepspeed_config(cfg.ds_config, cfg, world)
    shards = open_shards(cfg.data.shards, cfg.data.split)
    mean, std = cfg.data.mean or shards.mean, cfg.data.std or shards.std
    if mean is None or std is None:
        raise ConfigError(
            "data.mean / data.std: the shards in data.shards have no _info.json beside them; "
            "set both (RGB in [0, 1], as `ssit-dist shard` computed for them)"
        )
    if shards.num_samples is None and cfg.steps_per_epoch is None:
        raise ConfigError(
            "steps_per_epoch: the sample count of the shards in data.shards is unknown "
            "(no _info.json beside them); set steps_per_epoch"
        )
    _verify_on_every_rank(shards, cfg.data.verify, device)
    steps_per_epoch = cfg.steps_per_epoch or max(shards.num_samples // cfg.global_batch, 1)  # type: ignore[operator]
    total_steps = cfg.epochs * steps_per_epoch
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    fingerprint = run_fingerprint(cfg, world, micro, accumulation, steps_per_epoch, shards, ds_config)
    plan = checkpoint.plan_resume(run_dir, fingerprint, cfg.resume, zero_stage, device)
    if plan.mode in ("force", "reshard"):
        log.warning(
            "resume=%s: resuming %s although the run changed:\n  %s", cfg.resume, plan.tag, "\n  ".join(plan.changed)
        )

    def record_run() -> None:
        save_config(cfg, run_dir)
        write_fingerprint(run_dir, fingerprint)

    on_rank_zero(record_run, device, f"writing {run_dir / 'config.yaml'}")

    engine, momentum_net = build_and_restore(cfg, ds_config, plan, device)
    precision = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    start_step = plan.step
    if plan.tag is not None:
        log.info("resumed (%s) from %s at step %d of %d", plan.mode, plan.tag, start_step, total_steps)

    stream = PairStream(
        shards,
        PairAugment(cfg.model.img_size, mean, std),
        micro,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        empty_timeout_s=cfg.data.empty_timeout_s,
    )
    loader = pair_loader(stream, cfg.data.workers, cfg.data.prefetch, cfg.data.pin_memory)
    meta = EncoderMeta(
        cfg.model.arch,
        cfg.model.img_size,
        cfg.model.timm_kwargs,
        int(engine.module.encoder.patch_embed.patch_size[0]),
        mean,
        std,
        {"zero_stage": engine.zero_optimization_stage(), "shards": cfg.data.shards, "fingerprint": fingerprint},
    )

    def save(step: int) -> str:
        client = {
            "step": step,
            "momentum": momentum_net.state_dict(),
            "config": asdict(cfg),
            "torch_rng": torch.get_rng_state(),
        }
        return checkpoint.save(
            engine, run_dir, step, client, meta.with_provenance(step=step), cfg.keep_checkpoints, device
        )

    reporter = on_rank_zero(
        lambda: Reporter(run_dir, total_steps, start_step), device, f"opening {run_dir / 'metrics.jsonl'}"
    )
    if any_rank(stop["requested"], device):
        raise StopRequested(f"stopped by signal during start-up, before step {start_step + 1}; relaunch to resume")
    batches = None
    try:
        step = start_step
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches is None or in_epoch == 0:
                stream.set_position(epoch, skip_batches=in_epoch * accumulation)
                batches = start_batches(loader)
            progress = step / steps_per_epoch
            lr = schedule.learning_rate(
                progress, cfg.scaled_lr(), cfg.optim.warmup_epochs, cfg.epochs, cfg.optim.min_lr
            )
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            momentum = schedule.momentum(progress, cfg.epochs, cfg.loss.momentum)
            saliency_weight = schedule.saliency_weight(
                progress, cfg.epochs, cfg.loss.saliency_weight, cfg.loss.saliency_cosine_decay
            )

            started = time.perf_counter()
            waits: list[float] = []  # seconds spent waiting for each micro batch
            losses = train_step(
                engine,
                momentum_net,
                _micro_batches(batches, accumulation, device, waits),
                momentum,
                cfg.loss.contrastive_weight,
                saliency_weight,
                precision,
            )
            contrastive, saliency = losses.contrastive.item(), losses.saliency.item()
            # Before anything is reported or saved: a non-finite loss anywhere stops every rank, and a
            # signal on any rank stops all of them after this step's checkpoint.
            diverged, stopping = any_ranks([not _finite((contrastive, saliency)), stop["requested"]], device)
            _raise_if(diverged, (contrastive, saliency), step, run_dir)
            step += 1
            elapsed = time.perf_counter() - started

            if reporter is not None:
                reporter.step(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "contrastive_loss": contrastive,
                        "saliency_loss": saliency,
                        "lr": lr,
                        "momentum": momentum,
                        "saliency_weight": saliency_weight,
                        "pairs_per_s": round(cfg.global_batch / elapsed, 2),
                        "step_s": round(elapsed, 4),
                        "data_wait_s": round(sum(waits), 4),
                        "peak_mem_mb": round(_peak_memory_mb(device), 1),
                    }
                )
            if step % cfg.checkpoint_every == 0 or step == total_steps or stopping:
                save(step)
            if stopping:
                raise StopRequested(f"stopped by signal after step {step}; relaunch to resume")
    finally:
        batches = None  # shuts the loader workers down now (they ignore the exit-time SIGTERM)
        if reporter is not None:
            reporter.close()
    return run_dir


def _verify_on_every_rank(shards: ShardSet, mode: str, device: torch.device) -> None:
    """Every rank checks the shards as it sees them (node-local copies differ), then all agree: a
    mismatch on any rank stops every rank, naming the rank, host and shard."""
    try:
        verify_shards(shards, mode, show_progress=rank() == 0)
        problem = None
    except ShardIndexError as e:
        problem = str(e)
    seen = gather_objects((socket.gethostname(), problem), device)
    failed = [f"rank {r} on {host}: {p}" for r, (host, p) in enumerate(seen) if p]
    if failed:
        raise ShardIndexError("the shards do not match their index:\n  " + "\n  ".join(failed))


def _micro_batches(batches: Iterator, count: int, device: torch.device, waits: list[float]) -> Iterator[Batch]:
    """The next `count` batches, on `device`, each agreed on by every rank before it is used: a rank
    whose loader failed would never join the forward's collectives, so all ranks stop together."""
    for _ in range(count):
        waited = time.perf_counter()
        try:
            batch, failure = next(batches), None
        except Exception as e:  # a starved source, a dead worker
            batch, failure = None, e
        waits.append(time.perf_counter() - waited)
        if any_rank(failure is not None, device):
            raise failure or SourceError("the data loader failed on another rank; see its log")
        yield tuple(t.to(device, non_blocking=True) for t in batch)


def _finite(losses: tuple[float, float]) -> bool:
    return all(math.isfinite(v) for v in losses)


def _raise_if(diverged: bool, losses: tuple[float, float], step: int, run_dir: Path) -> None:
    if not diverged:
        return
    where = f"contrastive {losses[0]}, saliency {losses[1]}" if not _finite(losses) else "on another rank"
    tag = checkpoint.latest_tag(run_dir)
    raise FloatingPointError(
        f"non-finite loss at step {step + 1} ({where}); the last good checkpoint is {tag or 'none'} in {run_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point for launch/pretrain.py: `--config FILE` and `section.field=value` overrides."""
    import argparse

    from ssit_dist.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description="SSiT pretraining with DeepSpeed")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        pretrain(cfg)
    except StopRequested as e:
        print(e, file=sys.stderr)
        return 0
    except (FloatingPointError, RankFailure, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ShardIndexError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":  # python -m / torchrun -m / deepspeed --module / accelerate launch -m
    sys.exit(main())
