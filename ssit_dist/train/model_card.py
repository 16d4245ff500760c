"""The model card (README.md) of an exported encoder, written from its run: what a reader of a shared
encoder needs to trust it (method, data with checksums, schedule, scale, final losses, the fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssit_dist.models.encoder_meta import EncoderMeta

CITATION = """@article{huang2024ssit,
  title   = {{SSiT}: Saliency-Guided Self-Supervised Image Transformer for Diabetic Retinopathy Grading},
  author  = {Huang, Yijin and Lyu, Junyan and Cheng, Pujin and Tam, Roger and Tang, Xiaoying},
  journal = {IEEE Journal of Biomedical and Health Informatics},
  volume  = {28},
  number  = {5},
  pages   = {2806--2817},
  year    = {2024},
  doi     = {10.1109/JBHI.2024.3362878}
}"""


def final_losses(run_dir: Path, last: int = 20) -> dict[str, float]:
    """Mean of each loss over the run's last `last` logged steps (metrics.jsonl)."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "contrastive_loss" in r][-last:]
    keys = ("contrastive_loss", "saliency_loss")
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys if rows and all(k in r for r in rows)}


def model_card(meta: EncoderMeta, run_dir: Path, tag: str, encoder: str) -> str:
    """README.md of an export folder: the run's facts as its checkpoint and metrics recorded them."""
    fingerprint: dict[str, Any] = meta.provenance.get("fingerprint") or {}
    fp = fingerprint.get
    saliency = (fp("model") or {}).get("saliency", True)
    method = "SSiT (saliency-guided MoCo v3)" if saliency else "MoCo v3 (SSiT with saliency off)"
    shards = fp("shards") or []
    steps = meta.provenance.get("step")
    losses = final_losses(run_dir)
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-feature-extraction, fundus, diabetic-retinopathy, self-supervised, ssit-dist]",
        "---",
        f"# {meta.arch}: {method} encoder ({encoder} network)",
        "",
        "A Vision Transformer encoder without classifier, pretrained by self-supervision on fundus",
        'photographs with ssit-dist. Load it with `timm.create_model("local-dir:PATH", pretrained=True)`;',
        f"inputs {meta.img_size} px, normalised with mean {meta.mean} and std {meta.std} (the pretraining",
        "photographs').",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method}; the {encoder} encoder |",
        f"| architecture | {meta.arch} {json.dumps(meta.timm_kwargs)} at {meta.img_size} px, patch {meta.patch_size} |",
        f"| checkpoint | {tag} of {run_dir}, step {steps} |",
        f"| schedule | {fp('epochs')} epochs x {fp('steps_per_epoch')} steps, seed {fp('seed')} |",
        f"| scale | global batch {fp('global_batch')} over {fp('world_size')} ranks "
        f"(micro batch {fp('micro_batch')}, accumulation {fp('gradient_accumulation')}) |",
        f"| ZeRO stage | {meta.provenance.get('zero_stage')} |",
        f"| final losses (mean of the last 20 logged steps) | {json.dumps(losses)} |",
        f"| photographs | {sum(int(s.get('samples') or 0) for s in shards)} in {len(shards)} shards |",
        "",
        "Data (every shard the run read, with its sha256):",
        "",
        *(f"- `{s.get('url')}`: {s.get('samples')} samples, sha256 `{s.get('sha256')}`" for s in shards),
        "",
        "The run's fingerprint (everything a resume depends on) is in config.json under `ssit_dist`.",
        "",
        "Nothing here says how well these features grade DR: evaluate them on your own labelled data",
        "(`ssit-dist finetune --init PATH`, `ssit-dist knn --init PATH`).",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
