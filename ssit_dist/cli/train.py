"""Commands that train or export: `pretrain`, `export`, `finetune`, `segment`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ssit_dist.cli.common import CONFIG_OPTION, NPROC_OPTION, console, fail, launch_ranks
from ssit_dist.cli.settings import read_settings, trainer_args


def pretrain(ctx: typer.Context, config: Path | None = CONFIG_OPTION, nproc: int = NPROC_OPTION) -> None:
    """Pretrain SSiT with DeepSpeed on this machine: `nproc` ranks, stopped together by Ctrl-C or SIGTERM
    (each saves, exit 0; a second Ctrl-C stops at once)."""
    from ssit_dist.config import ConfigError
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.train.pretrain_inputs import check_inputs

    # What every rank would check first, checked here once, before any rank starts.
    try:
        check_inputs(read_settings(ctx, config), nproc)
    except (ConfigError, ShardIndexError) as e:
        fail(str(e), 2)
    raise typer.Exit(launch_ranks("ssit_dist.train", ["pretrain", *trainer_args(ctx, config)], nproc))


def export(
    run_dir: Path = typer.Argument(..., help="Run folder of `ssit-dist pretrain`, or of `ssit-dist finetune`."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="OUTPUT.safetensors and OUTPUT.json, or the folder OUTPUT."
    ),
    tag: str | None = typer.Option(
        None,
        help="Checkpoint to export: a pretraining step, e.g. step00001000 (default: the latest); of a "
        "fine-tuning run best (default) or final.",
    ),
    encoder: str = typer.Option("query", help="query or momentum: which network's encoder (pretraining runs)."),
    format: str = typer.Option(
        "files", help="files: OUTPUT.safetensors + .json; timm: a folder timm.create_model('local-dir:OUTPUT') loads."
    ),
    overwrite: bool = typer.Option(False, help="Replace what OUTPUT names if it exists."),
) -> None:
    """Export an encoder of a pretraining checkpoint, or a fine-tuning run's grader (with its head and
    preprocessing), with timm key names: safetensors plus a JSON, or a timm folder with config.json and a
    model card. A grader exports for timm where timm has its pooling (pool token or avg)."""
    from ssit_dist.models.grader_files import is_finetuning_run
    from ssit_dist.train.export import export_encoder, export_grader

    try:
        if is_finetuning_run(run_dir):
            if encoder != "query":
                fail(f"--encoder {encoder}: {run_dir} is a fine-tuning run, whose grader has one encoder", 2)
            written = export_grader(run_dir, output, tag, overwrite, format)
        else:
            written = export_encoder(run_dir, output, tag, overwrite, encoder, format)
    except (OSError, ValueError) as e:  # FileNotFoundError, FileExistsError; ResumeError, GraderFileError
        fail(str(e), 1)
    console.print(f"wrote {' and '.join(map(str, written))}", markup=False)


def finetune(ctx: typer.Context, config: Path | None = CONFIG_OPTION, nproc: int = NPROC_OPTION) -> None:
    """Fine-tune and evaluate DR grading (quadratic weighted kappa) with Accelerate."""
    read_settings(ctx, config)  # a wrong field stops here, before any process starts
    raise typer.Exit(_accelerate_trainer("finetune", trainer_args(ctx, config), nproc))


def _accelerate_trainer(task: str, args: list[str], nproc: int) -> int:
    """A trainer run with Accelerate (ssit_dist.train.TASK): in this process for one, as `nproc` ranks for
    several (Accelerate reads their torch.distributed environment, as under srun); its exit code."""
    import importlib

    if nproc == 1:
        return int(importlib.import_module(f"ssit_dist.train.{task}").main(args))
    return launch_ranks("ssit_dist.train", [task, *args], nproc)


SYNTHETIC_VESSELS = {
    "train": 12,
    "val": 4,
    "test": 4,
}  # `segment --synthetic`: as many as tests/train/test_segment.py's


def segment(
    ctx: typer.Context,
    config: Path | None = CONFIG_OPTION,
    nproc: int = NPROC_OPTION,
    synthetic: bool = typer.Option(
        False,
        "--synthetic",
        help="No data needed: 20 synthetic photographs with vessel masks (12 train, 4 val, 4 test), written "
        "at `resize` px to RUN_DIR/synthetic_vessels, are the data.",
    ),
) -> None:
    """Segmentation evaluation of an encoder (vessels, lesions: Dice, IoU, AUC-PR) with Accelerate."""
    cfg = read_settings(ctx, config)
    args = trainer_args(ctx, config)
    if synthetic:
        args.append(f"data={_synthetic_vessels(cfg)}")
    raise typer.Exit(_accelerate_trainer("segment", args, nproc))


def _synthetic_vessels(cfg: Any) -> Path:
    """`segment --synthetic`'s data, written once here before any process starts: the demo's generator
    (data/packing/synthetic.py) paints vessels and writes their masks, the same photographs every time."""
    from ssit_dist.config import SegmentConfig
    from ssit_dist.data.packing.synthetic import write_synthetic_segmentation

    if cfg.data != SegmentConfig().data:
        fail(f"--synthetic writes its own data: leave out data ({cfg.data}), or --synthetic", 2)
    root = Path(cfg.run_dir) / "synthetic_vessels"
    count = sum(SYNTHETIC_VESSELS.values())
    console.print(f"writing {count} synthetic photographs at {cfg.resize} px to {root}", markup=False, soft_wrap=True)
    return write_synthetic_segmentation(root, SYNTHETIC_VESSELS, cfg.resize)
