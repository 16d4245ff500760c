"""timm Vision Transformer encoders and the salient-token forward of SSiT's key encoder."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint


def create_encoder(arch: str, img_size: int = 224, **timm_kwargs: Any) -> VisionTransformer:
    """A randomly initialised timm ViT without classifier head; `timm_kwargs` (patch_size, embed_dim,
    depth, num_heads, ...) override the architecture's defaults. Never downloads; weights come from
    `ssit_dist.models.pretrained.load_encoder`."""
    if not arch.startswith(("vit_", "deit_")) or arch not in timm.list_models():
        known = ", ".join(m for m in timm.list_models("vit_*_patch16_224"))
        raise ValueError(f"unknown ViT architecture {arch!r}; timm names such as {known}")
    patch = timm_kwargs.get("patch_size") or int(arch.split("patch")[1].split("_")[0])
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not divisible by the patch size {patch}")
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **timm_kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{arch!r} is not a timm VisionTransformer")
    return model


def use_fused_attention(vit: VisionTransformer, fused: bool) -> None:
    """Switch every block between timm's fused attention (torch's scaled_dot_product_attention) and the
    explicit matmul + softmax. Same function; which is faster depends on the device and dtype."""
    for block in vit.blocks:
        block.attn.fused_attn = fused  # type: ignore[union-attr]


def patch_size(vit: VisionTransformer) -> int:
    return int(vit.patch_embed.patch_size[0])


def encode(vit: VisionTransformer, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens after the final norm, (B, N, D). With `keep` (from salient_token_indices) only those tokens
    enter the transformer; positional embeddings are added before the selection. Calls `vit.blocks`, or
    each block through checkpoint: models/compile.py compiles both units."""
    tokens = vit._pos_embed(vit.patch_embed(x))
    if keep is not None:
        tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    tokens = vit.norm_pre(vit.patch_drop(tokens))
    if vit.grad_checkpointing and torch.is_grad_enabled():  # model.grad_checkpointing: keep one block's activations
        for block in vit.blocks:
            tokens = checkpoint(block, tokens, use_reentrant=False)  # DeepSpeed-safe: no reentrant autograd
        return vit.norm(tokens)
    return vit.norm(vit.blocks(tokens))
