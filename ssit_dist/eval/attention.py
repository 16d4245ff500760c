"""Where a ViT looks: the last block's attention from the CLS token to every patch, per head, and a PNG of
it over the input photographs (what `ssit-dist attention` draws).

timm's blocks use fused attention, which never forms the attention matrix; `cls_attention` recomputes it
from the last block's own query and key projections, as timm's unfused path does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from ssit_dist.data.decode import decode_bgr


@torch.no_grad()
def cls_attention(encoder: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(batch, heads, grid_h, grid_w): softmax attention of the CLS token to each patch token in the
    encoder's last block (prefix tokens left out, so a row sums to at most 1)."""
    captured: list[torch.Tensor] = []
    attn: Any = encoder.blocks[-1].attn  # timm's Attention (typed as Module | Tensor through nn.Sequential)
    handle = attn.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        encoder.forward_features(images)
    finally:
        handle.remove()
    tokens = captured[0]  # the last block's normalised input, (batch, tokens, dim)
    batch, count, dim = tokens.shape
    qkv = attn.qkv(tokens).reshape(batch, count, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    to_patches = weights[:, :, 0, encoder.num_prefix_tokens :]
    return to_patches.reshape(batch, attn.num_heads, *encoder.patch_embed.grid_size)


def load_photographs(
    paths: list[Path], size: int, mean: list[float] | None = None, std: list[float] | None = None
) -> tuple[list[np.ndarray], torch.Tensor]:
    """The photographs resized to `size` x `size` (BGR uint8, to draw) and as the encoder's input batch,
    normalised with `mean`/`std` (RGB in [0, 1]) or, without them, each photograph's own."""
    photos, inputs = [], []
    for path in paths:
        bgr = decode_bgr(path.read_bytes()) if path.is_file() else None
        if bgr is None:
            raise ValueError(f"{path}: not a readable image (JPEG, PNG, ...)")
        photo = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        rgb = torch.from_numpy(np.ascontiguousarray(photo[..., ::-1])).permute(2, 0, 1).float() / 255
        m = torch.tensor(mean) if mean else rgb.flatten(1).mean(1)
        s = torch.tensor(std) if std else rgb.flatten(1).std(1)
        photos.append(photo)
        inputs.append((rgb - m.view(3, 1, 1)) / s.view(3, 1, 1))
    return photos, torch.stack(inputs)


def attention_png(path: Path, photos: list[np.ndarray], maps: torch.Tensor, names: list[str], title: str) -> None:
    """One row per photograph: the photograph as the encoder saw it (BGR uint8, square) and the head-mean
    attention laid over it (brighter: more attention; each map scaled to its own maximum)."""
    size, margin, header = max(photos[0].shape[0], 224), 10, 60  # small inputs are drawn enlarged
    image = np.full((header + len(photos) * (size + 30), 2 * size + 3 * margin, 3), 255, np.uint8)
    cv2.putText(image, title[:70], (margin, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    legend = "photograph | CLS attention, mean of heads (bright: more)"
    cv2.putText(image, legend, (margin, 45), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1)
    for row, (photo, heads, name) in enumerate(zip(photos, maps, names, strict=True)):
        top = header + row * (size + 30)
        shown = cv2.resize(photo, (size, size), interpolation=cv2.INTER_LINEAR)
        mean = heads.mean(0).float().numpy()
        mean = cv2.resize(mean / max(float(mean.max()), 1e-12), (size, size), interpolation=cv2.INTER_NEAREST)
        heat = cv2.applyColorMap((mean * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        image[top : top + size, margin : margin + size] = shown
        image[top : top + size, 2 * margin + size : 2 * margin + 2 * size] = cv2.addWeighted(shown, 0.4, heat, 0.6, 0)
        cv2.putText(image, name[:60], (margin, top + size + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
