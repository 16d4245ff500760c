"""Commands that look at an encoder or a run: `knn`, `attention`, `plot`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ssit_dist import atomic
from ssit_dist.cli.common import CONFIG_OPTION, console, fail
from ssit_dist.cli.settings import read_settings


def _print_knn(result: dict) -> None:
    """knn_evaluate's result as the command shows it: a table of metrics per k, view retrieval, left-outs."""
    table = Table(title=f"kNN on {result['test']} (neighbours from {result['train']}, T = {result['temperature']})")
    for column in ("k", "samples", "accuracy", "QWK", "macro AUC"):
        table.add_column(column)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for kk, m in result["k"].items():
        table.add_row(kk, str(m["samples"]), fmt(m["accuracy"]), fmt(m["qwk"]), fmt(m["macro_auc"]))
    console.print(table)
    retrieval = result["view_retrieval"]
    console.print(
        f"view retrieval on {retrieval['samples']} test photographs (top-1 of the partner view): "
        f"{retrieval['top1']:.4f}, chance {retrieval['chance']:.4f}"
    )
    if result["missing"]:
        console.print(f"[yellow]left out (did not decode):[/] {escape(', '.join(result['missing']))}")


def knn(
    ctx: typer.Context,
    config: Path | None = CONFIG_OPTION,
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the results here as JSON."),
) -> None:
    """Grade by weighted kNN on frozen CLS features: QWK and accuracy for each k (`--k 5,10,20`)."""
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.eval.knn import knn_evaluate
    from ssit_dist.models.pretrained import EncoderInitError

    try:
        result = knn_evaluate(read_settings(ctx, config))
    except (ShardIndexError, EncoderInitError, ValueError) as e:
        fail(str(e))
    _print_knn(result)
    if output:
        atomic.write_json(output, result)
        console.print(f"wrote {output}", markup=False)


def attention(
    ctx: typer.Context,
    images: list[Path] = typer.Argument(..., help="Photographs (JPEG, PNG, ...) to look at."),
    config: Path | None = CONFIG_OPTION,
    output: Path = typer.Option(Path("attention.png"), "-o", "--output", help="PNG to write."),
    title: str | None = typer.Option(None, help="Title of the picture (default: names the encoder)."),
) -> None:
    """Last-layer CLS attention of an encoder over photographs, as one PNG (photograph | attention).
    Inputs are normalised with the export's mean/std where its JSON has them, else each photograph's own."""
    from ssit_dist.eval.attention import attention_png, cls_attention, load_photographs
    from ssit_dist.models.encoder_meta import EncoderMeta
    from ssit_dist.models.pretrained import EncoderInitError, load_encoder

    cfg = read_settings(ctx, config)
    described = Path(cfg.init).with_suffix(".json")
    meta = EncoderMeta.from_json(json.loads(described.read_text()), str(described)) if described.is_file() else None
    try:
        encoder, _ = load_encoder(cfg.init, cfg.img_size, cfg.arch, cfg.timm_kwargs, cfg.trust_pickle)
        photos, inputs = load_photographs(images, cfg.img_size, meta.mean if meta else None, meta.std if meta else None)
    except (EncoderInitError, ValueError) as e:
        fail(str(e), 2)
    maps = cls_attention(encoder.eval(), inputs)
    title = title or f"last-layer attention of {Path(cfg.init).name}"
    attention_png(output, photos, maps, [p.name for p in images], title)
    shown = f"attention of {len(images)} photographs ({maps.shape[1]} heads, {cfg.img_size} px): {output}"
    console.print(shown, markup=False)


def plot(
    run_dir: Path = typer.Argument(..., help="Folder of `ssit-dist pretrain` or `ssit-dist finetune`."),
    output: Path | None = typer.Option(None, "-o", "--output", help="PNG to write (default RUN_DIR/curves.png)."),
    title: str | None = typer.Option(None, help="Title above the curves (default: the run folder's name)."),
) -> None:
    """Training curves of a run as one PNG: losses, lr, momentum, pairs/s and view retrieval of a
    pretraining run; train loss, lr and validation metrics per epoch of a fine-tuning run."""
    from ssit_dist.eval.report import curves_png, run_curves

    try:
        x_name, series = run_curves(run_dir)
    except (OSError, ValueError) as e:
        fail(str(e), 2)
    out = output or run_dir / "curves.png"
    named = {name.replace("_", " "): points for name, points in series.items()}
    curves_png(out, named, x_name, title if title is not None else f"run {run_dir.resolve().name}")
    console.print(f"{len(series)} curves over {x_name}s: {out}", markup=False)
