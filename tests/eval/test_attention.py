"""Last-layer CLS attention (ssit_dist.eval.attention) and `ssit-dist attention`."""

from __future__ import annotations

from pathlib import Path

import cv2
import timm
import torch
from PIL import Image

from conftest import invoke_cli
from ssit_dist.eval.attention import cls_attention


def test_cls_attention_is_timms_own_attention() -> None:
    encoder = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
    ).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = cls_attention(encoder, images)
    # timm's unfused path forms the attention probabilities: they are the input of its attn_drop.
    attn = encoder.blocks[-1].attn
    attn.fused_attn = False
    seen: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        encoder.forward_features(images)
    handle.remove()
    assert ours.shape == (2, 3, 4, 4)
    assert torch.equal(ours, seen[0][:, :, 0, encoder.num_prefix_tokens :].reshape(ours.shape))
    assert (ours.flatten(2).sum(-1) < 1).all()  # the CLS token's attention to itself is left out


def test_attention_png_of_photographs(retina: Image.Image, tmp_path: Path) -> None:
    photo = tmp_path / "retina.png"
    retina.save(photo)
    out = tmp_path / "attention.png"
    tiny = '{"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}'
    shown = invoke_cli(
        "attention", photo, photo, "--init", "random", "--img-size", 64, "--timm-kwargs", tiny, "-o", out
    )
    assert "attention of 2 photographs (3 heads, 64 px)" in shown.stdout
    image = cv2.imread(str(out))
    assert image.shape == (60 + 2 * (224 + 30), 2 * 224 + 30, 3)  # small inputs drawn at 224 px
    bad = invoke_cli("attention", tmp_path / "missing.jpg", "--init", "random", "-o", out, check=False)
    assert bad.exit_code == 2 and "missing.jpg: not a readable image" in bad.stderr
