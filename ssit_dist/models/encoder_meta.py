"""The description of a pretrained encoder: what rebuilds it (timm architecture, input size, timm
overrides, patch size), how its inputs were normalised (mean / std of the shards it saw), and where it
came from. Pretraining writes it into each checkpoint's ssit_meta.json, `ssit-dist export` into
OUT.json beside the weights, and `load_encoder` (fine-tuning, kNN) reads it back.

On disk it is one flat JSON object: the six fields, then the provenance keys (run, checkpoint, step,
shards, fingerprint, ...), so `meta["arch"]` works for a reader without this class.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

FIELDS = ("arch", "img_size", "timm_kwargs", "patch_size", "mean", "std")


@dataclass(frozen=True, kw_only=True)
class EncoderMeta:
    arch: str
    img_size: int
    timm_kwargs: dict[str, Any]
    patch_size: int
    mean: list[float]
    std: list[float]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in FIELDS}, **self.provenance}

    @classmethod
    def from_json(cls, body: dict[str, Any], where: str = "encoder description") -> EncoderMeta:
        missing = [name for name in FIELDS[:3] if name not in body]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; re-export the encoder with `ssit-dist export`")
        return cls(
            arch=body["arch"],
            img_size=int(body["img_size"]),
            timm_kwargs=dict(body.get("timm_kwargs") or {}),
            patch_size=int(body.get("patch_size") or body.get("timm_kwargs", {}).get("patch_size") or 16),
            mean=list(body.get("mean") or []),
            std=list(body.get("std") or []),
            provenance={k: v for k, v in body.items() if k not in FIELDS},
        )

    def with_provenance(self, **more: Any) -> EncoderMeta:
        return replace(self, provenance={**self.provenance, **more})
