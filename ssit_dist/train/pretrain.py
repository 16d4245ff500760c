"""SSiT pretraining with DeepSpeed: setting a run up, as MAE's main_pretrain does.

`pretrain(cfg)` creates the process group and installs the stop handlers first, reads and checks the
shards (train/pretrain_inputs.py), takes the resume decision (train/checkpoint.py), builds the DeepSpeed engine and
the fp32 momentum network with the checkpoint restored into both, and hands the run to the loop in
train/pretrain_loop.py. Checkpoints come every `checkpoint_every` steps or `checkpoint_every_minutes`, at the
end, and after the step at which a stop is asked for (Ctrl-C, SIGTERM, SLURM's SIGUSR1 before the time
limit, the launcher's end: ssit_dist/stop.py); a relaunch resumes from the latest complete checkpoint at
the same schedule and data position.
`python -m ssit_dist.train.pretrain --config FILE [field=value]`.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssit_dist import stop as stop_signals
from ssit_dist.config import PretrainConfig
from ssit_dist.data.index import ShardIndexError
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.device_augment import DevicePairAugment
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.sources import ShardSet, verify_shards
from ssit_dist.data.loading.stream import PairStream, pair_loader
from ssit_dist.dist import (
    any_rank,
    gather_objects,
    on_rank_zero,
    problems_on_ranks,
    rank,
    world_size,
)
from ssit_dist.eval.retrieval import fixed_pairs
from ssit_dist.info import cpu_runs_natively
from ssit_dist.models.batchnorm import convert_batchnorm
from ssit_dist.models.compile import compile_model
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.ssit import OnlineNetwork, SSiT
from ssit_dist.stop import StopRequest
from ssit_dist.train import checkpoint_deepspeed as checkpoint
from ssit_dist.train import run as skeleton
from ssit_dist.train.checkpoint import ResumeError, ResumePlan
from ssit_dist.train.checkpoint_deepspeed import plan_resume
from ssit_dist.train.pretrain_inputs import RunInputs, check_inputs
from ssit_dist.train.pretrain_loop import Run, train
from ssit_dist.train.pretrain_step import Views
from ssit_dist.train.report import Reporter

log = logging.getLogger("ssit_dist.pretrain")


def run_fingerprint(cfg: PretrainConfig, world: int, inputs: RunInputs) -> dict:
    """Everything a resume depends on (train/run.py)."""
    shards = inputs.shards
    return skeleton.fingerprint(
        cfg,
        ("global_batch", "epochs", "seed", "model"),
        world_size=world,
        micro_batch=inputs.micro,
        gradient_accumulation=inputs.accumulation,
        steps_per_epoch=inputs.steps_per_epoch,
        # The epoch's order and each stream's share (data/loading/epoch.py): a resume replays them exactly.
        data_order={
            "workers": cfg.data.workers,
            "piece_size": cfg.data.piece_size,
            "shuffle_buffer": cfg.data.shuffle_buffer,
        },
        optimizer_groups=list(OnlineNetwork.OPTIMIZER_GROUPS),
        # DeepSpeed's timers change no number of the run: a resume may turn them on or off.
        ds_config={key: value for key, value in inputs.ds_config.items() if key != "timers"},
        shards=[
            {"url": url, "samples": n, "bytes": size, "sha256": digest}
            for url, n, size, digest in zip(shards.paths, shards.lengths, shards.sizes, shards.sha256, strict=True)
        ],
    )


def epoch_plan(cfg: PretrainConfig, inputs: RunInputs, world: int) -> EpochPlan:
    """Which samples each rank's loader workers read, epoch by epoch (data/loading/epoch.py)."""
    return EpochPlan(
        tuple(inputs.shards.lengths),  # type: ignore[arg-type]  # check_inputs made sure every count is known
        world,
        cfg.data.workers,
        inputs.micro,
        inputs.batches_per_rank,
        cfg.seed,
        cfg.data.piece_size,
        cfg.data.shuffle_buffer,
        inputs.shards.sequential,  # remote shards are read whole: they cannot seek
    )


def build_and_restore(cfg: PretrainConfig, ds_config: dict, plan: ResumePlan, device: torch.device) -> tuple[Any, Any]:
    """Collective. The DeepSpeed engine of the online network and the fp32 momentum network, with the
    checkpoint `plan` names loaded into both (converted to the new world size first for a reshard)."""
    import deepspeed

    if plan.mode == "reshard":
        checkpoint.to_universal(Path(cfg.run_dir), plan.tag, device)  # type: ignore[arg-type]
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    torch.manual_seed(cfg.seed)
    model = SSiT(cfg.model)
    model.use_fused_attention(cfg.model.fused_attention(device.type))
    # Always, even on one process: the same all-reduce at any world size, and a BatchNorm that takes the
    # bf16 weights DeepSpeed's bf16 engine gives it.
    convert_batchnorm(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model.online, model_parameters=model.online.optimizer_groups(), config=ds_config
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


def _log_placement(device: torch.device) -> None:
    """Which ranks run on which host, once, from rank 0: the first thing to read when nodes disagree."""
    hosts = gather_objects(socket.gethostname(), device)
    if rank() == 0:
        by_host: dict[str, list[int]] = {}
        for r, host in enumerate(hosts):
            by_host.setdefault(host, []).append(r)
        placement = "; ".join(f"{host}: ranks {' '.join(map(str, ranks))}" for host, ranks in by_host.items())
        log.info("%d ranks on %d hosts (%s)", len(hosts), len(by_host), placement)


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining as `cfg` says; returns the run folder."""
    # First: a signal during start-up (SLURM preempting a job that is still waiting for its peers or
    # loading) means exit cleanly at the first point where every rank can agree, without training.
    stop = stop_signals.install()
    run = set_up(cfg, stop)
    train(run, stop)
    return run.run_dir


def set_up(cfg: PretrainConfig, stop: StopRequest) -> Run:
    """The process group, the checked inputs, the agreed resume plan, the engine and momentum network with
    the checkpoint restored, the pair stream. Unlike fine-tuning's, resuming is part of the set-up: DeepSpeed
    builds its engine from the plan (a universal checkpoint changes the engine's config)."""
    device = skeleton.start_deepspeed(cfg.dist_timeout_s)
    _log_placement(device)
    world = world_size()
    inputs = check_inputs(cfg, world)
    _verify_on_every_rank(inputs.shards, cfg.data.verify, device)
    fingerprint = run_fingerprint(cfg, world, inputs)
    zero_stage = int(inputs.ds_config.get("zero_optimization", {}).get("stage", 0))
    plan = skeleton.agree_on_resume(
        cfg, fingerprint, lambda: plan_resume(Path(cfg.run_dir), fingerprint, cfg.resume, zero_stage, device), device
    )
    engine, momentum_net = build_and_restore(cfg, inputs.ds_config, plan, device)
    precision = prepare_engine(cfg, engine, momentum_net, device)
    stream = PairStream(
        inputs.shards,
        PairAugment(cfg.model.img_size, inputs.mean, inputs.std, cfg.augment.view1, cfg.augment.view2),
        epoch_plan(cfg, inputs, world),
        empty_timeout_s=cfg.data.empty_timeout_s,
        encoded=cfg.data.augment_on == "gpu",
    )
    total_steps = cfg.epochs * inputs.steps_per_epoch
    run = Run(
        cfg=cfg,
        engine=engine,
        momentum_net=momentum_net,
        stream=stream,
        loader=pair_loader(
            stream, cfg.data.prefetch, cfg.data.pin_memory and device.type == "cuda", cfg.stall_timeout_s()
        ),
        run_dir=Path(cfg.run_dir),
        device=device,
        precision=precision,
        accumulation=inputs.accumulation,
        steps_per_epoch=inputs.steps_per_epoch,
        total_steps=total_steps,
        start_step=plan.step,
        meta=encoder_meta(cfg, engine, inputs, fingerprint),
        reporter=on_rank_zero(
            lambda: Reporter(Path(cfg.run_dir), total_steps, plan.step), device, f"opening {cfg.run_dir}/metrics.jsonl"
        ),
        to_device=views_on_device(cfg, inputs, device),
        retrieval_pairs=retrieval_pairs(cfg, inputs, stream.augment, device),
    )
    if any_rank(stop.requested, device):
        if run.reporter is not None:
            run.reporter.close()
        raise stop_signals.StopRequested(f"stopped during start-up, before step {plan.step + 1}; relaunch to resume")
    if plan.tag is not None:
        log.info("resumed (%s) from %s at step %d of %d", plan.mode, plan.tag, plan.step, total_steps)

    return run


def prepare_engine(cfg: PretrainConfig, engine: Any, momentum_net: Any, device: torch.device) -> torch.dtype | None:
    """Compiles where asked and possible; returns the engine's autocast precision (None: fp32), warning
    where this CPU would only emulate it."""
    if cfg.model.compile:
        reason = compile_model(engine.module.encoder, momentum_net, device, engine.zero_optimization_stage())
        if reason is not None:
            log.warning("model.compile: left eager: %s", reason)
    precision = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    if device.type == "cpu" and precision is not None and not cpu_runs_natively(precision):
        log.warning(
            "%s is emulated on this CPU (no AVX512-BF16/AMX or AVX512-FP16): a step takes several times as long "
            "as in fp32; ds_config=zero0_fp32 (or a copy of %s without %s) trains faster here",
            precision,
            cfg.ds_config,
            "bf16" if precision is torch.bfloat16 else "fp16",
        )
    return precision


def views_on_device(cfg: PretrainConfig, inputs: RunInputs, device: torch.device) -> Callable[[Any], Views]:
    """A loader batch -> the step's four tensors on the device: copied (augmented in the workers) or
    decoded and augmented there (data.augment_on=gpu)."""
    if cfg.data.augment_on == "gpu":
        on_device = DevicePairAugment(cfg.model.img_size, inputs.mean, inputs.std)
        return lambda batch: on_device(batch, device)

    def copy(batch: Any) -> Views:
        x1, x2, s1, s2 = (t.to(device, non_blocking=True) for t in batch)
        return x1, x2, s1, s2

    return copy


def encoder_meta(cfg: PretrainConfig, engine: Any, inputs: RunInputs, fingerprint: dict) -> EncoderMeta:
    """What every checkpoint and export says about its encoder."""
    return EncoderMeta(
        arch=cfg.model.arch,
        img_size=cfg.model.img_size,
        timm_kwargs=cfg.model.timm_kwargs,
        patch_size=int(engine.module.encoder.patch_embed.patch_size[0]),
        mean=inputs.mean,
        std=inputs.std,
        provenance={
            "zero_stage": engine.zero_optimization_stage(),
            "shards": cfg.data.shards,
            "fingerprint": fingerprint,
        },
    )


def retrieval_pairs(
    cfg: PretrainConfig, inputs: RunInputs, augment: PairAugment, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rank 0's fixed view pairs of the held-out photographs, where retrieval.shards names them."""
    held_out = inputs.held_out
    if held_out is None:
        return None
    return on_rank_zero(
        lambda: fixed_pairs(held_out, augment, cfg.retrieval.samples, cfg.seed),
        device,
        f"reading the view-retrieval photographs of {cfg.retrieval.shards}",
    )


def _verify_on_every_rank(shards: ShardSet, mode: str, device: torch.device) -> None:
    """Every rank checks the shards as it sees them (node-local copies differ), then all agree: a
    mismatch on any rank stops every rank, naming the rank, host and shard."""
    try:
        verify_shards(shards, mode, show_progress=rank() == 0)
        problem = None
    except ShardIndexError as e:
        problem = str(e)
    failed = problems_on_ranks(problem, device)
    if failed:
        raise ShardIndexError("the shards do not match their index:\n  " + "\n  ".join(failed))


def main(argv: list[str] | None = None) -> int:
    """Entry point for launch/pretrain.py: `--config FILE` and `section.field=value` overrides; exit codes
    as train/run.py says."""
    return skeleton.main(pretrain, PretrainConfig, "SSiT pretraining with DeepSpeed", argv)


if __name__ == "__main__":  # python -m / torchrun -m / deepspeed --module / accelerate launch -m
    sys.exit(main())
