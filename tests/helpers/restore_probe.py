"""Run under torchrun by tests/train/test_reshard.py: restore a checkpoint exactly as pretraining does
(`pretrain.build_and_restore`, with a universal-checkpoint conversion for mode `reshard`), then write
what the restore produced, gathered whole: the fp32 master weights, both Adam moments and the fp32
momentum network. Rank 0 writes them as safetensors for the test to compare across world sizes.

usage: restore_probe.py CONFIG TAG STEP MODE OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

from ssit_dist.config import batch_layout, deepspeed_config, load_config
from ssit_dist.dist import init_process_group, rank, shutdown, world_size
from ssit_dist.train.checkpoint import ResumePlan
from ssit_dist.train.pretrain import build_and_restore


def main() -> None:
    config, tag, step, mode, out = sys.argv[1:6]
    cfg = load_config(Path(config))
    device = init_process_group(cfg.dist_timeout_s)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    batch_layout(cfg.global_batch, world_size(), cfg.micro_batch)  # the same check pretraining makes
    engine, momentum = build_and_restore(
        cfg, deepspeed_config(cfg.ds_config, cfg, world_size()), ResumePlan(tag, int(step), mode), device
    )
    # ZeRO 1/2 link each parameter to its slice of the optimizer state at the first step; read before
    # any step, the link is made here (a read of DeepSpeed's own state, nothing is changed).
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():  # collectives: every rank takes part
        state[f"fp32/{name}"] = safe_get_full_fp32_param(param)
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"{moment}/{name}"] = safe_get_full_optimizer_state(param, moment)
    # Adam's step count (its bias correction): one value per rank's partition, the same on every rank.
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
    state["adam_step"] = torch.tensor(steps)
    for key, value in momentum.state_dict().items():  # weights and the Kahan compensation (extra state)
        tensors = value["compensation"] if key.endswith("_extra_state") else [value]
        state.update({f"momentum/{key}/{i}": t for i, t in enumerate(tensors)})
    if rank() == 0:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, out)
    shutdown()


if __name__ == "__main__":
    main()
