"""SSiT pretraining with DeepSpeed: the training loop.

Per optimizer step: set lr / momentum / saliency weight from the fractional epoch, move the fp32
momentum network towards the full fp32 query weights, then for each micro batch compute keys from the
salient patches, the two losses through the DeepSpeed engine, backward and step. Checkpoints every
`checkpoint_every` steps, at the end, and when SIGTERM or SIGUSR1 arrives (SLURM's warning before the
time limit); a relaunch resumes from the latest complete checkpoint at the same schedule position and
data position.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist

from ssit_dist.config import ConfigError, PretrainConfig, batch_layout, deepspeed_config, save_config
from ssit_dist.data.augment import PairAugment
from ssit_dist.data.stream import PairStream, open_shards, pair_loader, start_batches
from ssit_dist.dist import full_fp32_parameters, rank, world_size
from ssit_dist.models.batchnorm import convert_batchnorm
from ssit_dist.models.ssit import SSiT
from ssit_dist.train import checkpoint, schedule
from ssit_dist.train.report import Reporter

log = logging.getLogger("ssit_dist.pretrain")


class StopRequested(Exception):
    """SIGTERM / SIGUSR1 arrived: a checkpoint was saved and the run stops cleanly."""


def init_distributed() -> torch.device:
    """Process group from the launcher's environment (deepspeed, torchrun, srun, or none)."""
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain srun: one task per rank
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    if world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining as `cfg` says; returns the run folder."""
    import deepspeed

    device = init_distributed()
    run_dir = Path(cfg.run_dir)
    world = world_size()
    micro, accumulation = batch_layout(cfg.global_batch, world, cfg.micro_batch)
    ds_config = deepspeed_config(cfg.ds_config, cfg, world)
    shards = open_shards(cfg.data.shards, cfg.data.split)
    mean, std = cfg.data.mean or shards.mean, cfg.data.std or shards.std
    if mean is None or std is None:
        raise ConfigError("data.mean / data.std: the shards in data.shards have no _info.json beside them; "
                          "set both (RGB in [0, 1], as `ssit-dist shard` computed for them)")
    if shards.num_samples is None and cfg.steps_per_epoch is None:
        raise ConfigError("steps_per_epoch: the sample count of the shards in data.shards is unknown "
                          "(no _info.json beside them); set steps_per_epoch")
    steps_per_epoch = cfg.steps_per_epoch or max(shards.num_samples // cfg.global_batch, 1)  # type: ignore[operator]
    total_steps = cfg.epochs * steps_per_epoch
    if rank() == 0:
        save_config(cfg, run_dir)

    torch.manual_seed(cfg.seed)
    model = SSiT(cfg.model)
    if world > 1:
        convert_batchnorm(model, device.type)
    engine, _, _, _ = deepspeed.initialize(model=model.online, model_parameters=model.online.parameters(),
                                           config=ds_config)
    momentum_net = model.momentum.to(device)
    precision = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None

    start_step = 0
    state = checkpoint.load_latest(engine, run_dir)
    if state is not None:
        momentum_net.load_state_dict(state["momentum"])
        start_step = int(state["step"])
        log.info("resumed from step %d of %d", start_step, total_steps)

    stream = PairStream(shards, PairAugment(cfg.model.img_size, mean, std), micro,
                        seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer)
    loader = pair_loader(stream, cfg.data.workers, cfg.data.prefetch, cfg.data.pin_memory)
    stop = {"requested": False}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: stop.update(requested=True))
    meta = {"arch": cfg.model.arch, "img_size": cfg.model.img_size, "timm_kwargs": cfg.model.timm_kwargs,
            "patch_size": int(model.online.encoder.patch_embed.patch_size[0]), "mean": mean,
            "std": std, "zero_stage": engine.zero_optimization_stage(), "shards": cfg.data.shards}

    def save(step: int) -> str:
        client = {"step": step, "momentum": momentum_net.state_dict(), "config": asdict(cfg),
                  "torch_rng": torch.get_rng_state()}
        return checkpoint.save(engine, run_dir, step, client, {**meta, "step": step}, cfg.keep_checkpoints)

    reporter = Reporter(run_dir, total_steps, start_step) if rank() == 0 else None
    batches = None
    try:
        step = start_step
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches is None or in_epoch == 0:
                stream.set_position(epoch, skip_batches=in_epoch * accumulation)
                batches = start_batches(loader)
            progress = step / steps_per_epoch
            lr = schedule.learning_rate(progress, cfg.scaled_lr(), cfg.optim.warmup_epochs, cfg.epochs, cfg.optim.min_lr)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            m = schedule.momentum(progress, cfg.epochs, cfg.loss.momentum)
            ss_weight = schedule.saliency_weight(progress, cfg.epochs, cfg.loss.ss_weight, cfg.loss.ss_cosine_decay)

            started = time.perf_counter()
            momentum_net.update((t for module in engine.module.ema_source() for t in full_fp32_parameters(module)), m)
            data_wait, cl_sum, ss_sum = 0.0, 0.0, 0.0
            for _ in range(accumulation):
                waited = time.perf_counter()
                x1, x2, s1, s2 = (t.to(device, non_blocking=True) for t in next(batches))
                data_wait += time.perf_counter() - waited
                with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                    if precision is not None:
                        x1, x2 = x1.to(precision), x2.to(precision)
                    k1, k2 = momentum_net(x1, s1), momentum_net(x2, s2)
                    cl, ss = engine(x1, x2, s1, s2, k1, k2)
                    loss = cfg.loss.cl_weight * cl + ss_weight * ss
                if _any_rank(not math.isfinite(loss.item())):  # every rank stops, none waits in a collective
                    tag = checkpoint.latest_tag(run_dir)
                    raise FloatingPointError(f"non-finite loss at step {step + 1} (contrastive {cl.item()}, saliency "
                                             f"{ss.item()}); the last good checkpoint is {tag or 'none'} in {run_dir}")
                engine.backward(loss)
                engine.step()
                cl_sum += cl.item() / accumulation
                ss_sum += ss.item() / accumulation
            step += 1
            elapsed = time.perf_counter() - started

            if reporter is not None:
                reporter.step({"step": step, "epoch": round(step / steps_per_epoch, 4), "cl_loss": cl_sum,
                               "ss_loss": ss_sum, "lr": lr, "momentum": m, "ss_weight": ss_weight,
                               "pairs_per_s": round(cfg.global_batch / elapsed, 2), "step_s": round(elapsed, 4),
                               "data_wait_s": round(data_wait, 4), "peak_mem_mb": round(_peak_memory_mb(device), 1)})
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                save(step)
            if _any_rank(stop["requested"]):
                if step % cfg.checkpoint_every and step != total_steps:
                    save(step)
                raise StopRequested(f"stopped by signal after step {step}; relaunch to resume")
    finally:
        batches = None  # shuts the loader workers down now (they ignore the exit-time SIGTERM)
        if reporter is not None:
            reporter.close()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point for launch/pretrain.py: `--config FILE` and `section.field=value` overrides."""
    import argparse

    from ssit_dist.config import ConfigError, load_config
    from ssit_dist.data.index import ShardIndexError

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
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ShardIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
