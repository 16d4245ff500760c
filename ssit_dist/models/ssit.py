"""SSiT: saliency-guided self-supervised image transformer (Huang et al., IEEE JBHI 2024).

Two networks:
- `OnlineNetwork`, the trainable side (query encoder, projector, predictor, saliency head); this is what a
  training engine (DeepSpeed) wraps. Its forward takes the keys and returns the two losses.
- `MomentumNetwork` (models/momentum.py), the fp32 EMA key side, outside any engine.

`SSiT` holds both (and reads the reference's checkpoints); the training step that drives them, with the
reference's order of momentum update, keys and losses, is `ssit_dist.train.pretrain_step.train_step`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ssit_dist.models.heads import PixelHead, predictor, projector
from ssit_dist.models.losses import contrastive_loss, saliency_loss
from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.momentum import MomentumNetwork
from ssit_dist.models.vit import create_encoder, encode, patch_size, use_fused_attention


class OnlineNetwork(nn.Module):
    """The trainable side of SSiT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.init:  # start from local weights (an export, a reference checkpoint, timm weights)
            from ssit_dist.models.pretrained import load_encoder

            self.encoder = load_encoder(cfg.init, cfg.img_size, cfg.arch, cfg.timm_kwargs)[0]
        else:
            self.encoder = create_encoder(cfg.arch, cfg.img_size, **cfg.timm_kwargs)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)  # models/vit.py `encode` honours it
        dim = self.encoder.embed_dim
        self.projector = projector(dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = predictor(cfg.proj_dim, cfg.proj_hidden)
        # MoCo v3 mode (saliency off) has no saliency head at all: no parameters that never get a gradient.
        self.saliency_head = PixelHead(dim, patch_size(self.encoder)) if cfg.saliency else None

    # The optimizer's parameter groups, in order; a run's fingerprint records them (train/pretrain.py): a
    # checkpoint's optimizer state is laid out group by group and fits only this layout.
    OPTIMIZER_GROUPS = ("encoder+projector", "predictor+saliency_head")

    def ema_source(self) -> list[nn.Module]:
        """The modules the momentum network averages, in its parameter order."""
        return [self.encoder, self.projector]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Every parameter, in the two groups `OPTIMIZER_GROUPS` names: what the momentum network mirrors
        (`ema_source`), then the rest. DeepSpeed's ZeRO keeps each group in flat partitions of its own, so
        the momentum update gathers the first group alone, not the predictor and saliency head with it
        (models/momentum.py). The groups set no hyperparameters: both take the ds_config's lr and weight
        decay, as the single group did."""
        mirrored = [p for module in self.ema_source() for p in module.parameters()]
        ids = {id(p) for p in mirrored}
        return [{"params": mirrored}, {"params": [p for p in self.parameters() if id(p) not in ids]}]

    def _check(self, x: torch.Tensor, saliency: torch.Tensor) -> None:
        if x.shape[-2:] != saliency.shape[-2:] or saliency.shape[:2] != (x.shape[0], 1):
            raise ValueError(
                f"saliency map shape {tuple(saliency.shape)} does not match images {tuple(x.shape)}; "
                "expected (B, 1, H, W) with the images' B, H, W"
            )
        if self.training and x.shape[0] < 2:
            raise ValueError("batch size 1 per rank in training mode: BatchNorm in the projector needs at least 2")

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive, saliency) losses of views x1, x2 with saliency maps s1, s2 in [0, 1] and the
        momentum network's keys k1, k2 of the same views."""
        self._check(x1, s1)
        self._check(x2, s2)
        prefix = self.encoder.num_prefix_tokens
        # Both views through the encoder in one pass (half the kernel launches, larger matmuls); the
        # projector's BatchNorm still sees each view on its own, as in the reference.
        f1, f2 = encode(self.encoder, torch.cat([x1, x2])).chunk(2)
        q1 = self.predictor(self.projector(f1[:, 0]))
        q2 = self.predictor(self.projector(f2[:, 0]))
        t = self.cfg.temperature
        contrastive = contrastive_loss(q1, k2, t) + contrastive_loss(q2, k1, t)
        if self.saliency_head is None:
            return contrastive, contrastive.new_zeros(())
        thr = self.cfg.saliency_threshold
        saliency = saliency_loss(self.saliency_head(f1[:, prefix:]), s1, thr) + saliency_loss(
            self.saliency_head(f2[:, prefix:]), s2, thr
        )
        return contrastive, saliency


class SSiT(nn.Module):
    """Online and momentum networks together; the momentum network starts as a copy of the online
    encoder and projector."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.online = OnlineNetwork(cfg)
        mask_ratio = cfg.mask_ratio if cfg.saliency else None  # MoCo v3: the keys see every patch
        self.momentum = MomentumNetwork(self.online.encoder, self.online.projector, mask_ratio, cfg.pool)

    def use_fused_attention(self, fused: bool) -> None:
        for encoder in (self.online.encoder, self.momentum.encoder):
            use_fused_attention(encoder, fused)

    @classmethod
    def from_reference(
        cls,
        state_dict: dict[str, torch.Tensor],
        arch: str = "vit_small_patch16_224",
        img_size: int = 224,
        **kwargs: Any,
    ) -> SSiT:
        """Build SSiT from a reference-repo training checkpoint's state dict.

        Accepts the reference's `checkpoint.pt` dict or its `state_dict`, with keys `base_encoder.*`,
        `momentum_encoder.*` (each with its projector as `head.*`), `predictor.*`,
        `saliency_segmentor.0.*`, with or without a `module.` prefix. `kwargs` are ModelConfig fields
        (proj_hidden, proj_dim, temperature, mask_ratio, pool, saliency_threshold) or timm kwargs
        (patch_size, embed_dim, depth, num_heads, ...).
        """
        if "state_dict" in state_dict:  # the whole checkpoint.pt dict (epoch, state_dict, optimizer, scaler)
            state_dict = state_dict["state_dict"]  # type: ignore[assignment]
        fields = set(ModelConfig.__dataclass_fields__)
        cfg = ModelConfig(
            arch=arch,
            img_size=img_size,
            timm_kwargs={k: v for k, v in kwargs.items() if k not in fields},
            **{k: v for k, v in kwargs.items() if k in fields},
        )
        model = cls(cfg)
        state = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        renames = [
            (r"^base_encoder\.head\.", "online.projector."),
            (r"^base_encoder\.", "online.encoder."),
            (r"^momentum_encoder\.head\.", "momentum.projector."),
            (r"^momentum_encoder\.", "momentum.encoder."),
            (r"^predictor\.", "online.predictor."),
            (r"^saliency_segmentor\.0\.", "online.saliency_head.proj."),
        ]
        mapped = {}
        for key, value in state.items():
            for pattern, replacement in renames:
                if re.match(pattern, key):
                    mapped[re.sub(pattern, replacement, key)] = value
                    break
            else:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
        missing, unexpected = model.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]  # EMA compensation starts at 0
        if missing or unexpected:
            raise ValueError(
                f"reference state dict does not fit {arch} at {img_size}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model
