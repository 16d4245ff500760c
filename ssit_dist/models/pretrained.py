"""Encoders to fine-tune from: an `ssit-dist export`, a reference SSiT checkpoint, local timm weights,
or random initialisation.

Nothing is unpickled unless the user says the file is trusted: state dicts load with
`weights_only=True`; the reference's `epoch_N.pt` (a pickled module) needs `trust_pickle`. Positional
embeddings are resampled when the fine-tuning image size differs from the one the weights were
trained at.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.timm_folder import is_timm_folder, read_timm_folder
from ssit_dist.models.vit import create_encoder


class EncoderInitError(ValueError):
    """An encoder source that cannot initialise the requested model; the message names both."""


@dataclass
class EncoderSource:
    """What an encoder was built from, written into fine-tuning outputs as provenance."""

    kind: str  # export | reference | timm | random
    path: str | None
    arch: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def load_encoder(
    init: str,
    img_size: int,
    arch: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> tuple[VisionTransformer, EncoderSource]:
    """A timm ViT (no classifier) at `img_size`, initialised from `init`: "random", an export's
    `.safetensors` (its `.json` beside it gives arch and timm kwargs), an export folder or any timm
    folder (config.json + model.safetensors, models/timm_folder.py), a reference `checkpoint.pt` /
    `epoch_N.pt`, or a state dict with timm key names (`.safetensors`, `.pth`, `.bin`)."""
    if init == "random":
        name = arch or "vit_small_patch16_224"
        return _create(name, img_size, timm_kwargs or {}), EncoderSource("random", None, name, timm_kwargs or {})
    path = Path(init)
    folder = is_timm_folder(path)
    if not (path.is_file() or folder):
        raise EncoderInitError(f"encoder file or timm folder {path} not found (or use --init random)")
    description = path.with_suffix(".json")
    if folder or (path.suffix == ".safetensors" and description.is_file()):
        try:
            if folder:
                state, meta = read_timm_folder(path)
            else:
                meta = EncoderMeta.from_json(json.loads(description.read_text()), str(description))
                state = _read_state(path, trust_pickle)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            raise EncoderInitError(f"{path}: {e}") from None
        exported = (meta.arch, meta.timm_kwargs)
        if (arch is not None and arch != exported[0]) or (timm_kwargs and timm_kwargs != exported[1]):
            raise EncoderInitError(
                f"{path} holds a {_describe(*exported)} encoder, but the run asks for "
                f"{_describe(arch or exported[0], timm_kwargs or {})}; leave arch and "
                "timm_kwargs unset to use the file's"
            )
        source = EncoderSource(
            "export",
            str(path),
            exported[0],
            exported[1],
            {"pretrained_img_size": meta.img_size, "checkpoint": meta.provenance.get("checkpoint")},
        )
    else:
        state = _read_state(path, trust_pickle)
        kind = "reference" if any(k.startswith("base_encoder.") for k in state) else "timm"
        if kind == "reference":
            state = {k[len("base_encoder.") :]: v for k, v in state.items() if k.startswith("base_encoder.")}
        source = EncoderSource(kind, str(path), arch or "vit_small_patch16_224", timm_kwargs or {})
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}  # projector / classifier
    encoder = _create(source.arch, img_size, source.timm_kwargs)
    _load_into(encoder, state, path, source)
    return encoder, source


def _create(arch: str, img_size: int, timm_kwargs: dict[str, Any]) -> VisionTransformer:
    try:
        return create_encoder(arch, img_size, **timm_kwargs)
    except (ValueError, TypeError) as e:  # unknown arch, size not divisible by the patch, bad kwargs
        raise EncoderInitError(f"cannot build {_describe(arch, timm_kwargs)} at {img_size} px: {e}") from None


def _describe(arch: str | None, timm_kwargs: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in sorted(timm_kwargs.items()))
    return f"{arch}" + (f" ({extra})" if extra else "")


def _read_state(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise EncoderInitError(
                f"{path} is a pickled Python object (such as the reference's epoch_N.pt "
                "module), which can run arbitrary code when loaded; pass --trust-pickle "
                "only if you trust where it came from"
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderInitError(f"{path} holds no state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def _load_into(encoder: VisionTransformer, state: dict[str, torch.Tensor], path: Path, source: EncoderSource) -> None:
    own = encoder.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = encoder.patch_embed.grid_size
        if state["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=list(grid), num_prefix_tokens=1 if encoder.cls_token is not None else 0
            )
    wanted = _describe(source.arch, source.timm_kwargs)
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise EncoderInitError(
                f"{path} does not fit {wanted}: {key} is {tuple(value.shape)} in the file, "
                f"{tuple(own[key].shape)} in the model (another architecture or size?)"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise EncoderInitError(f"{path} does not fit {wanted}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    encoder.load_state_dict(state)
