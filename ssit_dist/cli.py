"""The `ssit-dist` command: thin Typer commands, each calling one library function."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ssit_dist import atomic
from ssit_dist.data.index import INFO_NAME, ShardIndex
from ssit_dist.data.packing.inputs import Inputs
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.eval.knn import KnnConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SSiT pretraining for fundus photographs, at scale.")
console = Console()
err = Console(stderr=True)


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "-- img/s", style="cyan")


def _launch_ranks(module: str, args: list[str], nproc: int) -> int:
    """`nproc` ranks of the trainer `module` on this machine (ssit_dist/local_launch.py); each takes its
    share of the cores itself (ssit_dist/runtime.py)."""
    from ssit_dist.local_launch import launch

    return launch(module, args, nproc, dict(os.environ))


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _field_option(
    config: type, name: str, *param_decls: str, text: typing.Callable[[Any], str] | None = None, note: str = ""
) -> Any:
    """A Typer option with the default and help of the config dataclass's field `name`, so that the command
    and the config never disagree. `text`: the default as the option spells it (a list as "5,10,20");
    `note` ends the help (how the option is spelt)."""
    import dataclasses

    field = next(f for f in dataclasses.fields(config) if f.name == name)
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    if default is dataclasses.MISSING:
        default = ...  # required
    elif text is not None and default is not None:
        default = text(default)
    help_text = field.metadata["help"] + (f", {note}" if note else "")
    return typer.Option(default, *param_decls, help=f"{help_text[:1].upper()}{help_text[1:]}.")


def flags_as_overrides(args: list[str], kind: type) -> list[str]:
    """`--run-dir X`, `--out=X` (an alias) or `--linear` (a bool) -> `run_dir=X`, `linear=true` for the
    top-level fields of config dataclass `kind`; `field=value` passes through. The dataclass stays the one
    place that declares a field, its default and its help (`ssit-dist config`)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(kind)
    names = {f.name: f.name for f in dataclasses.fields(kind)}
    names |= {f.metadata["alias"]: f.name for f in dataclasses.fields(kind) if f.metadata.get("alias")}
    overrides, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--"):
            overrides.append(arg)
            continue
        flag, has_value, value = arg[2:].partition("=")
        field = names.get(flag.replace("-", "_"))
        if field is None:
            raise ValueError(
                f"unknown option {arg.split('=')[0]} (the fields, as --name or name=value: {', '.join(names)})"
            )
        if hints[field] is bool and not has_value:
            value = "true"
        elif not has_value:
            if not rest:
                raise ValueError(f"{arg} needs a value")
            value = rest.pop(0)
        overrides.append(f"{field}={value}")
    return overrides


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Versions, accelerator and DeepSpeed ops: paste this into bug reports."""
    from ssit_dist.info import collect

    report = collect()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("python", f"{report['python']}  ({report['platform']})")
    for name, version in report["packages"].items():
        table.add_row(name, version or "[red]not installed[/]")
    table.add_row("opencv", f"{report['opencv']['version']}, saliency module: {report['opencv']['saliency']}")
    if report["cuda"]:
        for d in report["cuda"]:
            table.add_row(
                f"cuda:{d['index']}", f"{d['name']}, {d['memory_gib']} GiB, sm {d['capability']}, bf16 {d['bf16']}"
            )
    else:
        table.add_row("cuda", "no CUDA device")
    cpu = report["cpu"]
    table.add_row(
        "cpu", f"{cpu['model']} ({cpu['cores']} cores, torch threads {cpu['torch_threads']}, {cpu['torch_capability']})"
    )
    table.add_row("cpu bf16/fp16", f"bf16 {cpu['bf16']}, fp16 {cpu['fp16']}, amx_bf16 {cpu['flags']['amx_bf16']}")
    ds = report["deepspeed"]
    table.add_row("deepspeed", f"accelerator {ds['accelerator']}, backend {ds['communication_backend']}")
    ops = ds["ops"]
    status = lambda o: "built" if o.get("jit_built") or o["prebuilt"] else ("compatible" if o["compatible"] else "no")  # noqa: E731
    table.add_row("deepspeed ops", ", ".join(f"{n}: {status(o)}" for n, o in ops.items()))
    table.add_row("extensions dir", ds["torch_extensions_dir"])
    console.print(table)


def _every_core(option: Any) -> Any:
    """The `workers` option with default 0, one worker per available core: the command packs with every
    core, while `ShardOptions` itself (the library, tests, the demo) defaults to one process."""
    option.default = 0
    return option


@app.command()
def shard(
    input: Path = typer.Argument(
        ..., help="Folder of fundus photographs (flat, grade folders 0-4, or train/val/test)."
    ),
    output: Path = typer.Argument(..., help="Folder for <split>-NNNNNN.tar shards and _info.json."),
    labels: list[Path] | None = typer.Option(
        None,
        metavar="FILE",
        help="Labels file: a CSV image,grade (paths relative to INPUT) or a public DR set's own (see "
        "--labels-format); repeat it for a set's split files (DDR's train.txt, valid.txt, test.txt).",
    ),
    labels_format: str = _field_option(ShardOptions, "labels_format"),
    split: str | None = _field_option(ShardOptions, "split"),
    group_by: str | None = _field_option(ShardOptions, "group_by"),
    seed: int = _field_option(ShardOptions, "seed"),
    size: int = _field_option(ShardOptions, "size"),
    shard_size: int = _field_option(ShardOptions, "shard_size"),
    workers: int = _every_core(_field_option(ShardOptions, "workers")),
    saliency: str = _field_option(ShardOptions, "saliency"),
    jpeg_roundtrip: bool = _field_option(ShardOptions, "jpeg_roundtrip", "--jpeg-roundtrip/--no-jpeg-roundtrip"),
    quality: int = _field_option(ShardOptions, "quality"),
    strict: bool = _field_option(ShardOptions, "strict"),
    overwrite: bool = _field_option(ShardOptions, "overwrite"),
    preview: int = _field_option(ShardOptions, "preview"),
) -> None:
    """Pack fundus photographs into WebDataset shards with precomputed saliency maps."""
    opts = _shard_options(
        size=size,
        shard_size=shard_size,
        workers=workers,
        saliency=saliency,
        jpeg_roundtrip=jpeg_roundtrip,
        quality=quality,
        seed=seed,
        labels_format=labels_format,
        split=split,
        group_by=group_by,
        overwrite=overwrite,
        preview=preview,
        strict=strict,
    )
    started = time.perf_counter()
    inputs, index = _pack_with_progress(input, output, labels or [], opts)
    _print_packed(index, inputs, input, output, time.perf_counter() - started, opts.preview > 0)


def _shard_options(**values: Any) -> ShardOptions:
    """The command's options as ShardOptions; one it refuses fails as the user typed it: `--size 30: ...`."""
    from ssit_dist.fields import ConfigError

    try:
        return ShardOptions(**values)
    except ConfigError as e:
        name, _, problem = str(e).partition(" = ")
        _fail(f"--{name.replace('_', '-')} {problem}" if name in values else str(e), 1)
        raise AssertionError from e  # unreachable: _fail exits


def _pack_with_progress(input: Path, output: Path, labels: list[Path], opts: ShardOptions) -> tuple[Inputs, ShardIndex]:
    """Find the inputs and pack them, with a progress bar on a terminal; a refused input fails the command."""
    from ssit_dist.data.packing.inputs import InputError, discover
    from ssit_dist.data.packing.shard import ShardError, pack

    try:
        inputs = discover(input, labels, opts.split, opts.seed, opts.group_by, opts.labels_format)
        columns = (TextColumn("[bold]packing"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, disable=not err.is_terminal) as progress:
            task = progress.add_task("pack", total=len(inputs.items))
            return inputs, pack(input, output, inputs, opts, lambda _: progress.advance(task))
    except (InputError, ShardError, ValueError) as e:
        _fail(str(e), 1)
        raise AssertionError from e  # unreachable: _fail exits


_SKIPS_SHOWN = 10  # skipped inputs printed one a line; the index lists them all
_ABSENT_SHOWN = 5  # labels rows naming an absent photograph printed; the file beside the shards lists them all


def _print_packed(index: ShardIndex, inputs: Inputs, input: Path, output: Path, elapsed: float, preview: bool) -> None:
    """What was packed: samples, shards and grades per split, what was skipped or left out, the rate and
    the normalisation statistics. Long lists are cut: the index and the list of absent photographs beside
    it hold them whole."""
    table = Table(title=f"{output}", title_justify="left")
    grouped = index.parameters.get("group_by")
    for column in ("split", "samples", "shards", "grades 0/1/2/3/4", *([f"{grouped}s"] if grouped else [])):
        table.add_column(column)
    for s in index.splits.values():
        grades = "/".join(str(s.label_histogram[str(g)]) for g in range(5)) if s.label_histogram else "-"
        table.add_row(s.name, str(s.num_samples), str(len(s.filenames)), grades, *([str(s.groups)] if grouped else []))
    console.print(table)
    for skip in index.skipped[:_SKIPS_SHOWN]:
        where = f"{skip['path']}:{skip['line']}" if skip["line"] else skip["path"]
        console.print(f"[yellow]skipped[/] {escape(str(where))}: {escape(skip['reason'])}", highlight=False)
    if len(index.skipped) > _SKIPS_SHOWN:
        console.print(
            f"[yellow]skipped[/] {len(index.skipped) - _SKIPS_SHOWN} more, each with its reason under "
            f'"skipped" in {escape(str(output / INFO_NAME))}',
            highlight=False,
        )
    labels = " ".join(index.parameters.get("labels") or [])
    if index.missing_photographs:
        console.print(
            f"[yellow]absent[/] {index.missing_photographs} photographs that {escape(labels)} names are not under "
            f"{escape(str(input))} (a partial download?), for example:",
            highlight=False,
        )
        for row in inputs.missing[:_ABSENT_SHOWN]:
            console.print(f"  {row.file}:{row.line}: {row.image}", markup=False, highlight=False)
        listed = output / str(index.missing_photographs_file)
        console.print(f"  every one in {listed}", markup=False, highlight=False)
    if index.ungradable:
        console.print(f"[yellow]excluded[/] {index.ungradable} rows marked ungradable in {escape(labels)}")
    if inputs.refused:
        console.print(
            f"[yellow]left out[/] {inputs.refused} photographs under {escape(str(input))} whose rows in "
            f"{escape(labels)} are skipped (a grade that is not 0-4, a malformed row; listed above)",
            highlight=False,
        )
    if index.not_in_labels:
        console.print(
            f"[yellow]left out[/] {index.not_in_labels} photographs under {escape(str(input))} "
            f"that no row of {escape(labels)} names",
            highlight=False,
        )
    if index.photograph_sizes:
        _print_sizes(index.photograph_sizes, index.parameters["size"])
    # The rate of photographs decoded and written: label rows cost next to nothing and would inflate it.
    n = index.num_samples
    console.print(
        f"packed {n} photographs in {elapsed:.1f} s ({n / elapsed:.1f} photographs/s); "
        f"mean {index.mean} std {index.std}",
        highlight=False,
    )
    if preview:
        console.print(f"preview: {output / 'preview.png'}", markup=False)


def _print_sizes(sizes: dict[str, Any], size: int) -> None:
    """The photographs' sizes and the packed sides; those kept below --size, and what mixed sides mean."""

    def spread(low: str, median: str, high: str) -> str:
        return low if low == high else f"{low} to {high} (median {median})"

    source, side = sizes["source"], sizes["packed_side"]
    seen = spread(*("x".join(map(str, source[k])) for k in ("min", "median", "max")))
    packed = spread(*(str(side[k]) for k in ("min", "median", "max")))
    console.print(f"photographs {seen}, packed at {packed} px", highlight=False)
    if sizes["kept_own_size"]:
        console.print(
            f"[yellow]kept[/] {sizes['kept_own_size']} photographs smaller than --size {size} at their own size: "
            "none is enlarged",
            highlight=False,
        )
    if side["min"] != side["max"]:
        # The device augmentation decodes a batch as one tensor: it refuses JPEGs of several sizes.
        fit = side["min"] // 16 * 16
        console.print(
            "[yellow]mixed sizes[/]: pretraining with data.augment_on=cpu takes them, augment_on=gpu needs one size"
            + (f": --size {fit} packs every photograph at {fit} px" if fit >= 32 else ""),
            highlight=False,
        )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pretrain(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help="Run config (YAML or JSON); field=value overrides follow."),
    nproc: int = typer.Option(1, help="Processes (ranks) on this machine: GPUs, or CPU ranks without GPUs."),
) -> None:
    """Pretrain SSiT with DeepSpeed on this machine: `nproc` ranks, stopped together by Ctrl-C or SIGTERM
    (each saves, exit 0; a second Ctrl-C stops at once)."""
    from ssit_dist.config import ConfigError, PretrainConfig, load_config
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.train.pretrain import check_inputs

    args = (["--config", str(config)] if config else []) + list(ctx.args)
    # What every rank would check first, checked here once, before any rank starts.
    try:
        check_inputs(load_config(config, list(ctx.args), PretrainConfig), nproc)
    except (ConfigError, ShardIndexError) as e:
        _fail(str(e), 2)
    raise typer.Exit(_launch_ranks("ssit_dist.train.pretrain", args, nproc))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run folder of `ssit-dist pretrain`."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="OUTPUT.safetensors and OUTPUT.json, or the folder OUTPUT."
    ),
    tag: str | None = typer.Option(None, help="Checkpoint to export, e.g. step00001000 (default: the latest)."),
    encoder: str = typer.Option("query", help="query or momentum: which network's encoder."),
    format: str = typer.Option(
        "files", help="files: OUTPUT.safetensors + .json; timm: a folder timm.create_model('local-dir:OUTPUT') loads."
    ),
    overwrite: bool = typer.Option(False, help="Replace what OUTPUT names if it exists."),
) -> None:
    """Export an encoder of a checkpoint with timm key names: safetensors plus a JSON, or a timm folder
    with config.json and a model card."""
    from ssit_dist.train.checkpoint import export_encoder

    try:
        written = export_encoder(run_dir, output, tag, overwrite, encoder, format)
    except (OSError, ValueError) as e:  # FileNotFoundError, FileExistsError; ResumeError: an incomplete checkpoint
        _fail(str(e), 1)
    console.print(f"wrote {' and '.join(map(str, written))}", markup=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help="Config file (YAML/JSON); field=value overrides follow."),
    nproc: int = typer.Option(1, help="Processes: GPUs, or CPU processes (gloo) without GPUs."),
) -> None:
    """Fine-tune and evaluate DR grading (quadratic weighted kappa) with Accelerate.

    Every field of `ssit-dist config finetune` is set as field=value or as a flag: --train FOLDER[:SPLIT],
    --val, --test, --init, --run-dir (--out), --linear, --trust-pickle, ..."""
    from ssit_dist.config import FinetuneConfig

    raise typer.Exit(_accelerate_trainer("ssit_dist.train.finetune", FinetuneConfig, ctx.args, config, nproc))


def _accelerate_trainer(module: str, kind: type, extra: list[str], config: Path | None, nproc: int) -> int:
    """A trainer module run with Accelerate, `--field value` flags as overrides of config class `kind`: in
    this process for one, as `nproc` ranks for several (Accelerate reads their torch.distributed
    environment, as under srun); its exit code."""
    import importlib

    try:
        args = (["--config", str(config)] if config else []) + flags_as_overrides(extra, kind)
    except ValueError as e:
        _fail(str(e), 2)
    if nproc == 1:
        return int(importlib.import_module(module).main(args))
    return _launch_ranks(module, args, nproc)


SYNTHETIC_VESSELS = {"train": 12, "val": 4, "test": 4}  # `segment --synthetic`: as many as tests/test_segment.py's


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def segment(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help="Config file (YAML/JSON); field=value overrides follow."),
    nproc: int = typer.Option(1, help="Processes: GPUs, or CPU processes (gloo) without GPUs."),
    synthetic: bool = typer.Option(
        False,
        "--synthetic",
        help="No data needed: 20 synthetic photographs with vessel masks (12 train, 4 val, 4 test), written "
        "at `resize` px to RUN_DIR/synthetic_vessels, are the data.",
    ),
) -> None:
    """Segmentation evaluation of an encoder (vessels, lesions: Dice, IoU, AUC-PR) with Accelerate.

    Every field of `ssit-dist config segment` is set as field=value or as a flag: --data FOLDER, --init,
    --run-dir (--out), --linear, --iterations, ..."""
    from ssit_dist.config import SegmentConfig

    extra = list(ctx.args)
    if synthetic:
        extra.append(f"data={_synthetic_vessels(config, extra)}")
    raise typer.Exit(_accelerate_trainer("ssit_dist.train.segment", SegmentConfig, extra, config, nproc))


def _synthetic_vessels(config: Path | None, extra: list[str]) -> Path:
    """`segment --synthetic`'s data, written once here before any process starts: the demo's generator
    (data/packing/synthetic.py) paints vessels and writes their masks, the same photographs every time."""
    from ssit_dist.config import ConfigError, SegmentConfig, load_config
    from ssit_dist.data.packing.synthetic import write_synthetic_segmentation

    try:
        cfg = load_config(config, flags_as_overrides(extra, SegmentConfig), SegmentConfig)
    except (ConfigError, ValueError) as e:
        _fail(str(e), 2)
    if cfg.data != SegmentConfig().data:
        _fail(f"--synthetic writes its own data: leave out data ({cfg.data}), or --synthetic", 2)
    root = Path(cfg.run_dir) / "synthetic_vessels"
    count = sum(SYNTHETIC_VESSELS.values())
    console.print(f"writing {count} synthetic photographs at {cfg.resize} px to {root}", markup=False, soft_wrap=True)
    return write_synthetic_segmentation(root, SYNTHETIC_VESSELS, cfg.resize)


@app.command("data-plan")
def data_plan(
    shards: list[str] = typer.Argument(..., help="Shard folders or brace patterns, as data.shards takes them."),
    world: int = typer.Option(..., help="Ranks (GPUs) of the run."),
    workers: int = typer.Option(..., help="Loader workers per rank (data.workers)."),
    global_batch: int = typer.Option(..., help="Pairs per optimizer step over all ranks."),
    epochs: int = typer.Option(1, help="Epochs to plan."),
    micro_batch: int | None = typer.Option(None, help="Pairs per rank and forward (default: no accumulation)."),
    steps_per_epoch: int | None = typer.Option(None, help="As the run's steps_per_epoch (default: samples // batch)."),
    split: str = typer.Option("train", help="Split of the folders (data.split)."),
    seed: int = typer.Option(0, help="The run's seed."),
    piece_size: int = typer.Option(64, help="data.piece_size."),
    shuffle_buffer: int = typer.Option(1000, help="data.shuffle_buffer."),
) -> None:
    """What a pretraining run will read, without training: per epoch the distinct samples, the samples read
    twice and the bytes read per byte used, from the stream's own code on tar headers only (a `pipe:` or
    `https://` source is read through, as the run would read it). Prints JSON."""
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.data.loading.dry_run import dry_run
    from ssit_dist.data.loading.sources import open_shards
    from ssit_dist.fields import ConfigError

    try:
        report = dry_run(
            open_shards(shards, split),
            world,
            workers,
            global_batch,
            epochs,
            micro_batch,
            steps_per_epoch,
            seed,
            piece_size,
            shuffle_buffer,
        )
    except (ShardIndexError, ConfigError, ValueError) as e:
        _fail(str(e))
    print(json.dumps(report, indent=2))


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


@app.command()
def knn(
    train: str = _field_option(KnnConfig, "train"),
    test: str = _field_option(KnnConfig, "test"),
    init: str = _field_option(KnnConfig, "init"),
    img_size: int = _field_option(KnnConfig, "img_size"),
    k: str = _field_option(KnnConfig, "ks", text=lambda ks: ",".join(map(str, ks)), note="comma-separated"),
    temperature: float = _field_option(KnnConfig, "temperature"),
    arch: str | None = _field_option(KnnConfig, "arch"),
    timm_kwargs: str | None = _field_option(KnnConfig, "timm_kwargs", note="given as JSON"),
    trust_pickle: bool = _field_option(KnnConfig, "trust_pickle", "--trust-pickle"),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the results here as JSON."),
) -> None:
    """Grade by weighted kNN on frozen CLS features: QWK and accuracy for each k."""
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.eval.knn import knn_evaluate
    from ssit_dist.models.pretrained import EncoderInitError

    try:
        ks = [int(v) for v in k.split(",")]
    except ValueError:
        _fail(f"--k {k}: expected neighbour counts separated by commas, e.g. 5,10,20")
    try:
        kwargs = json.loads(timm_kwargs) if timm_kwargs else None
    except json.JSONDecodeError as e:
        _fail(f"--timm-kwargs {timm_kwargs}: not JSON ({e}); write e.g. '{{\"embed_dim\": 96}}'")
    try:
        config = KnnConfig(
            train=train,
            test=test,
            init=init,
            img_size=img_size,
            ks=ks,
            temperature=temperature,
            arch=arch,
            timm_kwargs=kwargs,
            trust_pickle=trust_pickle,
        )
        result = knn_evaluate(config)
    except (ShardIndexError, EncoderInitError, ValueError) as e:  # ConfigError is a ValueError
        _fail(str(e))
    _print_knn(result)
    if output:
        atomic.write_json(output, result)
        console.print(f"wrote {output}", markup=False)


@app.command()
def attention(
    images: list[Path] = typer.Argument(..., help="Photographs (JPEG, PNG, ...) to look at."),
    init: str = typer.Option(..., help="Encoder: an export .safetensors, a reference checkpoint, or 'random'."),
    output: Path = typer.Option(Path("attention.png"), "-o", "--output", help="PNG to write."),
    img_size: int | None = typer.Option(None, help="Input size (default: the export's, else 224)."),
    arch: str | None = typer.Option(None, help="timm architecture (default: the export's)."),
    timm_kwargs: str | None = typer.Option(None, help="timm overrides as JSON, for 'random' or a bare state dict."),
    title: str | None = typer.Option(None, help="Title of the picture (default: names the encoder)."),
) -> None:
    """Last-layer CLS attention of an encoder over photographs, as one PNG (photograph | attention).
    Inputs are normalised with the export's mean/std where its JSON has them, else each photograph's own."""
    from ssit_dist.eval.attention import attention_png, cls_attention, load_photographs
    from ssit_dist.models.encoder_meta import EncoderMeta
    from ssit_dist.models.pretrained import EncoderInitError, load_encoder

    described = Path(init).with_suffix(".json")
    meta = EncoderMeta.from_json(json.loads(described.read_text()), str(described)) if described.is_file() else None
    size = img_size or (meta.img_size if meta else 224)
    try:
        encoder, _ = load_encoder(init, size, arch, json.loads(timm_kwargs) if timm_kwargs else None)
    except (EncoderInitError, ValueError) as e:
        _fail(str(e), 2)
    try:
        photos, inputs = load_photographs(images, size, meta.mean if meta else None, meta.std if meta else None)
    except ValueError as e:
        _fail(str(e), 2)
    maps = cls_attention(encoder.eval(), inputs)
    title = title or f"last-layer attention of {Path(init).name}"
    attention_png(output, photos, maps, [p.name for p in images], title)
    console.print(f"attention of {len(images)} photographs ({maps.shape[1]} heads, {size} px): {output}", markup=False)


@app.command()
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
        _fail(str(e), 2)
    out = output or run_dir / "curves.png"
    named = {name.replace("_", " "): points for name, points in series.items()}
    curves_png(out, named, x_name, title if title is not None else f"run {run_dir.resolve().name}")
    console.print(f"{len(series)} curves over {x_name}s: {out}", markup=False)


@app.command()
def demo(
    output: Path = typer.Argument(Path("demo_out"), help="Folder for the demo's images, shards, runs and pictures."),
    data: Path | None = typer.Option(None, help="Your own folder of fundus photographs instead of the synthetic set."),
    labels: Path | None = typer.Option(None, help="With --data: CSV image,grade (paths relative to DATA)."),
    quick: bool = typer.Option(False, "--quick", help="A minute-long run of every stage: checks the setup only."),
    seed: int = typer.Option(0, help="Seeds the photographs, pretraining and fine-tuning (the README's spread: 0-2)."),
) -> None:
    """The whole pipeline in minutes: synthetic photographs (or --data), shards, SSiT pretraining with
    DeepSpeed on 2 ranks, export, fine-tuning and kNN from the export and from random init, pictures."""
    import dataclasses

    from ssit_dist.demo import QUICK, DemoPlan, Stage, run_demo

    if (data is None) != (labels is None):
        _fail("--data and --labels go together: a folder of photographs and its CSV of grades", 2)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
    )
    tasks: dict[str, Any] = {}
    notes_shown: dict[str, int] = {}
    with Progress(*columns, console=console) as progress:

        def report(stage: Stage) -> None:
            if stage.name not in tasks:
                tasks[stage.name] = progress.add_task(stage.name, total=stage.total, unit=stage.unit)
            progress.update(tasks[stage.name], completed=stage.done)
            for note in stage.notes[notes_shown.get(stage.name, 0) :]:
                progress.console.print(f"[yellow]{escape(note)}[/]", highlight=False)
            notes_shown[stage.name] = len(stage.notes)

        try:
            result = run_demo(
                output, report, data, labels, dataclasses.replace(QUICK if quick else DemoPlan(), seed=seed)
            )
        except (RuntimeError, ValueError, OSError) as e:
            _fail(str(e), 1)
    _print_demo(result, output)


def _print_demo(result: dict[str, Any], output: Path) -> None:
    """The demo's table, chance levels, segmentation lines and pictures."""
    table = Table(title=f"DR grading on the {result['test_samples']} test photographs ({result['data']})")
    for column in ("encoder", "fine-tuned QWK", "fine-tuned accuracy", "kNN QWK", "kNN accuracy", "view retrieval"):
        table.add_column(column)
    for name, row in result["rows"].items():
        keys = ("finetune_qwk", "finetune_accuracy", "knn_qwk", "knn_accuracy", "view_retrieval")
        table.add_row(name, *(f"{row[k]:.3f}" for k in keys))
    console.print(table)
    chance = result["chance"]
    console.print(
        f"contrastive loss: {result['contrastive_first20']:.3f} (first 20 steps) -> "
        f"{result['contrastive_last20']:.3f} (last 20), chance {chance['contrastive_loss']:.3f}; "
        f"view retrieval chance {chance['view_retrieval']:.3f}; accuracy of always answering the commonest "
        f"grade {chance['accuracy']:.3f}; QWK of any constant answer 0",
        highlight=False,
    )
    for name, seg in result["segmentation"].items():
        dice, auc_pr, floor = seg["dice"], seg["auc_pr"], seg["constant_dice"]
        console.print(
            f"vessels ({name}, synthetic): test Dice {dice:.3f}, AUC-PR {auc_pr:.3f}; all-foreground Dice {floor:.3f}"
        )
    for name, path in result["pictures"].items():
        console.print(f"{name}: {path}", highlight=False, markup=False)
    console.print(f"[bold green]demo done[/] in {result['seconds']:.0f} s: {escape(str(output / 'results.json'))}")


@app.command("config")
def show_config(kind: str = typer.Argument("pretrain", help="pretrain, finetune or segment")) -> None:
    """List every config field: name, type, default and what it does."""
    import dataclasses

    from ssit_dist.config import FinetuneConfig, PretrainConfig, SegmentConfig
    from ssit_dist.fields import describe, range_text

    kinds = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "segment": SegmentConfig}
    if kind not in kinds:
        _fail(f"config {kind!r}: expected pretrain, finetune or segment", 2)
    table = Table("field", "type", "default", "what it does", box=None, highlight=False)

    def add(config: Any, prefix: str) -> None:
        """The fields of a default config instance: a section's defaults are its own (augment.view2)."""
        hints = typing.get_type_hints(type(config))
        for f in dataclasses.fields(config):
            default = getattr(config, f.name)
            if dataclasses.is_dataclass(default):
                add(default, f"{prefix}{f.name}.")
                continue
            alias = f" (was {f.metadata['alias']})" if f.metadata.get("alias") else ""
            bounds = f.metadata.get("bounds")
            kind = describe(hints[f.name]) + (f", {range_text(bounds)}" if bounds else "")
            table.add_row(prefix + f.name, kind, json.dumps(default), f.metadata.get("help", "") + alias)

    add(kinds[kind](), "")
    console.print(table)


def _sbatch_script(name: str) -> Path:
    """launch/slurm/NAME.sbatch: inside the package in a wheel, the top-level folder in a checkout."""
    package = Path(__file__).resolve().parent
    for folder in (package / "slurm", package.parent / "launch" / "slurm"):
        if (folder / f"{name}.sbatch").is_file():
            return folder / f"{name}.sbatch"
    _fail(f"{name}.sbatch not found beside the package; reinstall ssit-dist", 2)
    raise AssertionError  # unreachable: _fail exits


def _sbatch_defaults(script: Path) -> dict[str, str]:
    """The script's own `#SBATCH --name=value` lines: what a job gets that the command line does not override."""
    prefix = "#SBATCH --"
    lines = [line.removeprefix(prefix) for line in script.read_text().splitlines() if line.startswith(prefix)]
    return dict(line.split("=", 1) for line in lines if "=" in line)


@app.command("slurm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def slurm(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="pretrain or finetune: launch/slurm/JOB.sbatch."),
    nodes: int = typer.Option(1, help="Nodes."),
    gpus_per_node: int | None = typer.Option(None, help="GPUs per node (one rank each)."),
    ranks_per_node: int | None = typer.Option(None, help="Ranks per node (default: GPUs per node, else 1)."),
    cpus_per_rank: int | None = typer.Option(
        None, help="Cores per rank, its loader workers included (default: the script's, pretrain 15, finetune 8)."
    ),
    mem_per_cpu: str | None = typer.Option(None, help="Memory per core, e.g. 8G (default: the script's, 4G)."),
    max_timeouts: int | None = typer.Option(
        None,
        min=0,
        help="pretrain: requeues at the time limit, at most (default 3; 0: the job ends at its first time "
        "limit). A job requeued by preemption or by `scancel --signal=USR1 --batch` is not counted.",
    ),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    account: str | None = typer.Option(None, help="SLURM account."),
    time_limit: str | None = typer.Option(None, "--time", help="Time limit, e.g. 24:00:00."),
    submit: bool = typer.Option(False, "--submit", help="Run the sbatch command, not only print it."),
) -> None:
    """Print (or --submit) the sbatch command of a SLURM job. The rest goes to the trainer: for pretrain
    --config FILE and field=value, for finetune train=... init=... run_dir=... field=value."""
    if job not in ("pretrain", "finetune"):
        _fail(f"job {job!r}: choose pretrain or finetune", 2)
    if job == "finetune" and max_timeouts is not None:
        _fail("--max-timeouts: a finetune job is never requeued at its time limit (it resumes when submitted again)")
    script = _sbatch_script(job)
    defaults = _sbatch_defaults(script)
    # The nodes run this interpreter (sbatch hands the environment to the job); whether they can see its
    # path cannot be known from here.
    env = {"SSIT_PYTHON": sys.executable}
    if job == "pretrain":
        env["SSIT_MAX_TIMEOUTS"] = str(3 if max_timeouts is None else max_timeouts)
    ranks = ranks_per_node or gpus_per_node or 1
    command = ["sbatch", f"--nodes={nodes}", f"--ntasks-per-node={ranks}"]
    command += [f"--gpus-per-node={gpus_per_node}"] * bool(gpus_per_node)
    command += [f"--cpus-per-task={cpus_per_rank or defaults['cpus-per-task']}"]
    command += [f"--mem-per-cpu={mem_per_cpu or defaults['mem-per-cpu']}"]
    options = [("--partition", partition), ("--account", account), ("--time", time_limit)]
    command += [f"{flag}={value}" for flag, value in options if value is not None]
    command += [str(script), *ctx.args]
    assignments = [f"{name}={shlex.quote(value)}" for name, value in env.items()]
    print(" ".join([*assignments, shlex.join(command)]), flush=True)  # plain: a command to copy, not rich markup
    if submit:
        raise typer.Exit(subprocess.call(command, env={**os.environ, **env}))
