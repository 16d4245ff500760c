"""The SSiT model's config section (`model.*`): in a module of its own, without torch or timm, so that
reading a config needs neither (models/ssit.py builds the model from it)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ssit_dist.configclass import configclass


@configclass
class ModelConfig:
    renamed: ClassVar[dict[str, str]] = {"weights": "init"}

    arch: str = Field(
        default="vit_small_patch16_224",
        description="timm architecture of the encoder (vit_small_patch16_224, vit_base_patch16_224, ...)",
    )
    img_size: int = Field(default=224, description="input size in pixels (square); a multiple of the patch size", gt=0)
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="timm overrides: patch_size, embed_dim, depth, num_heads, ..."
    )
    init: str | None = Field(
        default=None,
        description="initial encoder weights (an export, a reference checkpoint, timm weights); null: random",
    )
    proj_hidden: int = Field(default=4096, description="hidden width of the projector and predictor MLPs", gt=0)
    proj_dim: int = Field(default=256, description="output width of the projector and predictor", gt=0)
    temperature: float = Field(default=0.2, description="contrastive temperature T", gt=0)
    mask_ratio: float = Field(
        default=0.25, description="share of patches the key encoder drops (the least salient), in [0, 1)", ge=0, lt=1
    )
    pool: Literal["max", "avg"] = Field(
        default="max", description="how pixel saliency is pooled per patch for token selection: max or avg"
    )
    saliency_threshold: float = Field(
        default=0.5, description="saliency maps are binarised at this value for the saliency loss", gt=0, lt=1
    )
    attention: Literal["auto", "fused", "explicit"] = Field(
        default="auto",
        description="attention kernel: fused (scaled_dot_product_attention), explicit (matmul + softmax, as the "
        "reference), or auto: fused on GPUs, explicit on CPUs (faster there: bench/perf/model_step.py)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the encoders' transformer blocks and the momentum update (ZeRO 0-2; pays for "
        "ViT-B on GPUs: models/compile.py)",
    )
    saliency: bool = Field(
        default=True,
        description="false: plain MoCo v3, the ablation: keys from every patch, no saliency head, saliency loss 0",
    )
    grad_checkpointing: bool = Field(
        default=False,
        description="recompute each transformer block of the query encoder in the backward pass instead of keeping its "
        "activations: far less memory for about a third more compute, the same batch and the same gradients",
    )

    def fused_attention(self, device_type: str) -> bool:
        """Whether the encoders use the fused attention kernel on `device_type` ("cuda", "cpu", ...)."""
        return self.attention == "fused" or (self.attention == "auto" and device_type == "cuda")
