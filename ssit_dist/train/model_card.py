"""The model cards (README.md) of exports, written from their runs: what a reader of a shared encoder
needs to trust it (method, data with checksums, schedule, scale, final losses, the fingerprint), and of a
shared grader (its input and output, validation and test metrics, data with checksums, the encoder it
started from)."""

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
CITATION_SECTION = ("## Citation", "", "```bibtex", CITATION, "```", "")


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
        *CITATION_SECTION,
    ]
    return "\n".join(lines)


METRICS = ("samples", "qwk", "accuracy", "macro_auc", "referable_auc", "sensitivity", "specificity")


def grader_card(meta: dict[str, Any], run_dir: Path, checkpoint: str) -> str:
    """README.md of a grader's timm folder: how to feed it, what it outputs, how well it graded the run's
    validation and test splits (with intervals where the run recorded them), the data it was trained on
    with checksums, and the encoder it started from; each as the run's files recorded it."""
    prep, init = meta["preprocessing"], meta.get("init") or {}
    fingerprint_file = run_dir / "fingerprint.json"
    fingerprint = json.loads(fingerprint_file.read_text()) if fingerprint_file.is_file() else None
    regression = meta["objective"] == "regression"
    output = (
        f"one score; grade g where {meta['thresholds']} are the cuts between grades (g - 0.5 <= score < g + 0.5)"
        if regression
        else f"{meta['num_classes']} logits, one per grade 0..{meta['num_classes'] - 1}"
    )
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, fundus, diabetic-retinopathy, ssit-dist]",
        "---",
        f"# {meta['arch']}: diabetic-retinopathy grader ({meta['objective']}, pool {meta['pool']})",
        "",
        'Load it with `timm.create_model("local-dir:PATH", pretrained=True)`, or grade photographs as they come',
        "with `ssit-dist predict PHOTOS... --model PATH`, which preprocesses them as below.",
        "",
        "| | |",
        "|---|---|",
        f"| input | the fundus disc cropped to a square of {prep['size']} px (never enlarged), JPEG quality "
        f"{prep['quality']} (as `ssit-dist shard --size {prep['size']} --quality {prep['quality']}` packs), "
        f"resized to {meta['img_size']} px (bilinear, antialiased), normalised with mean {meta['mean']} and "
        f"std {meta['std']} (the training shards') |",
        f"| output | {output}; referable DR: grade >= 2 |",
        f"| architecture | {meta['arch']} {json.dumps(meta['timm_kwargs'])}, head on the {meta['pool']} pooling |",
        f"| weights | {checkpoint} of {run_dir}, epoch {meta.get('epoch')} (selected by validation "
        f"{meta.get('select_by', 'qwk')}) |",
        f"| started from | {_encoder_line(init, (fingerprint or {}).get('init_sha256'))} |",
        "",
        *_metrics_section(run_dir, checkpoint, meta),
        *_data_section(fingerprint_file, fingerprint),
        *CITATION_SECTION,
    ]
    return "\n".join(lines)


def _encoder_line(init: dict[str, Any], sha256: str | None) -> str:
    """The encoder fine-tuning started from (models/pretrained.py EncoderSource), with the file's sha256."""
    if not init:
        return "not recorded"
    details = init.get("details") or {}
    where = f" `{init['path']}`" if init.get("path") else ""
    checkpoint = f", checkpoint {details['checkpoint']}" if details.get("checkpoint") else ""
    digest = f", sha256 `{sha256}`" if sha256 else ""
    return f"{init.get('kind', 'unknown')} encoder{where}{checkpoint}{digest}"


def _metrics_section(run_dir: Path, checkpoint: str, meta: dict[str, Any]) -> list[str]:
    """The run's report.json metrics of these weights on val and test; without a report (an unfinished
    run), the validation metrics the weights were selected by."""
    report_file = run_dir / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    splits = report.get("final", {}) if checkpoint == "final" else report
    rows = {name: splits[name] for name in ("val", "test") if isinstance(splits.get(name), dict)}
    note = f"From {report_file}."
    if not rows and isinstance(meta.get("val"), dict):
        rows, note = {"val": meta["val"]}, f"{run_dir} has no report.json (unfinished): validation at selection."
    if not rows:
        return ["## Metrics", "", f"None recorded: {run_dir} has no report.json.", ""]
    # Fine-tuning reports each endpoint with its patient-bootstrap interval under "intervals" (older runs: none).
    rows = {name: {**m, **m.get("intervals", {})} for name, m in rows.items()}
    has_intervals = any(isinstance(v, dict) and "ci95" in v for m in rows.values() for v in m.values())
    if has_intervals:
        note += " Intervals: 95%, from 1,000 bootstrap resamples of patients."
    else:
        note += " The run recorded no intervals for them; `ssit-dist predict --labels` gives patient-bootstrap ones."
    table = [f"| split | {' | '.join(METRICS)} |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in rows.items():
        table.append(f"| {name} | {' | '.join(_value(m[k]) if k in m else '-' for k in METRICS)} |")
    return ["## Metrics", "", note, "", *table, ""]


def _value(value: Any) -> str:
    """A metric as the report holds it: a number, None (undefined), or {"value", "ci95"} (eval/crossval.py)."""
    if isinstance(value, dict) and "ci95" in value:
        low, high = value["ci95"]
        return f"{_value(value.get('value'))} (95% CI {_value(low)} to {_value(high)})"
    if value is None:
        return "undefined"
    return str(value) if isinstance(value, int) else f"{float(value):.4f}"


def _data_section(fingerprint_file: Path, fingerprint: dict[str, Any] | None) -> list[str]:
    """Every split the run read, with its shards' sha256, as its fingerprint.json recorded them."""
    if fingerprint is None:
        return ["## Data", "", f"Not recorded: {fingerprint_file} is absent.", ""]
    data = fingerprint.get("data") or {}
    lines = ["## Data", "", f"The shards each split was read from, with their sha256 (from {fingerprint_file}):", ""]
    for name, split in data.items():
        hashes = split.get("sha256") or []
        lines.append(f"- {name}: `{split.get('source')}`, {len(hashes)} shards")
        lines += [f"  - sha256 `{h}`" for h in hashes]
    return [*lines, ""]
