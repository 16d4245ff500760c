"""torch.compile of the encoders' transformer blocks and of the momentum update where it can run, and
the reason where it cannot.

The blocks hold nearly all of a ViT's work, and their shapes are fixed for a run, so inductor compiles
each encoder once. What is compiled is what models/vit.py `encode` calls: the block stack as one graph,
or, with model.grad_checkpointing in a forward that records gradients, each block on its own through
torch.utils.checkpoint (one graph serves every block of an encoder: they differ only in weights, which
are graph inputs). The patch embedding, the key network's salient-token selection (a data-dependent
gather) and the heads stay eager. The momentum update's seven memory-bound passes become one per
tensor (a third of its time on a CPU).

Measured (bench/perf/model_step.py): on an H200 in bf16, +21% for ViT-B/16 at 256 pairs per GPU, +4% for
ViT-S/16 at 256, slower for ViT-S/16 at 64 (launch-bound either way); on 2 CPU cores +6% in fp32 and
bf16 with the momentum update compiled too, for 1.5-2 minutes of compilation. Hence off by default
and on in the shipped ViT-B GPU recipe.
"""

from __future__ import annotations

import os
import shutil

import torch
from timm.models.vision_transformer import VisionTransformer

from ssit_dist.models.momentum import MomentumNetwork


def compile_model(
    online_encoder: VisionTransformer, momentum: MomentumNetwork, device: torch.device, zero_stage: int
) -> str | None:
    """Compile both encoders' blocks and the momentum update (inductor) in place. Returns None, or why
    everything was left eager."""
    reason = why_not_compiled(device, zero_stage)
    if reason is not None:
        return reason
    # A graph that still fails at its first call runs eagerly instead of ending the run; dynamo logs why.
    torch._dynamo.config.suppress_errors = True
    for encoder in (online_encoder, momentum.encoder):
        # Both units `encode` may call. A graph is built at its first call, so a run pays compile time
        # only for the path it takes; inside the stack's graph the blocks' own compiled calls are inlined.
        encoder.blocks.compile()
        for block in encoder.blocks:
            block.compile()
    momentum.compile_update()
    return None


def why_not_compiled(device: torch.device, zero_stage: int) -> str | None:
    """Why inductor cannot compile the model for `device` under `zero_stage`, or None where it can."""
    if zero_stage >= 3:
        return (
            "ZeRO-3 gathers every parameter in module hooks that torch.compile does not trace; "
            "use ZeRO 0-2 with model.compile, or leave it off"
        )
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        return "inductor needs a C++ compiler on CPU and none was found (set CXX or install g++)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton on GPUs and it is not installed (pip install triton)"
    return None
