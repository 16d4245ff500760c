"""Commands on data and the environment: `info`, `shard`, `data-plan`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ssit_dist.cli.common import CONFIG_OPTION, RateColumn, console, err, fail
from ssit_dist.cli.settings import read_settings
from ssit_dist.data.index import INFO_NAME, ShardIndex
from ssit_dist.data.packing.inputs import Inputs


def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Versions, accelerator and DeepSpeed ops: paste this into bug reports."""
    from ssit_dist.info import collect

    report = collect()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)


def _print_info(report: dict[str, Any]) -> None:
    """The environment report as a two-column table that fits one screen."""
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


def shard(
    ctx: typer.Context,
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
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Pack fundus photographs into WebDataset shards with precomputed saliency maps. It packs with every
    core (workers 0) unless told otherwise; the library's ShardOptions default to one process."""
    opts = read_settings(ctx, config, code=1, workers=0)
    started = time.perf_counter()
    inputs, index = _pack_with_progress(input, output, labels or [], opts)
    _print_packed(index, inputs, input, output, time.perf_counter() - started, opts.preview > 0)


def _pack_with_progress(input: Path, output: Path, labels: list[Path], opts: Any) -> tuple[Inputs, ShardIndex]:
    """Find the inputs and pack them, with a progress bar on a terminal; a refused input fails the command."""
    from ssit_dist.data.packing.inputs import InputError, discover
    from ssit_dist.data.packing.shard import ShardError, pack

    try:
        inputs = discover(input, labels, opts.split, opts.seed, opts.group_by, opts.labels_format)
        columns = (TextColumn("[bold]packing"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, disable=not err.is_terminal) as progress:
            task = progress.add_task("pack", total=len(inputs.items))
            return inputs, pack(input, output, inputs, opts, lambda _: progress.advance(task))
    except (InputError, ShardError, ValueError) as e:
        fail(str(e), 1)


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
    _print_left_out(index, inputs, input, output)
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


def _print_left_out(index: ShardIndex, inputs: Inputs, input: Path, output: Path) -> None:
    """The inputs not packed, each kind with its count and where the whole list is."""
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


def data_plan(
    ctx: typer.Context,
    shards: list[str] | None = typer.Argument(
        None, help="Shard folders or brace patterns, as data.shards takes them (default: the config's)."
    ),
    world: int = typer.Option(..., help="Ranks (GPUs) of the run."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """What a pretraining run will read, without training: per epoch the distinct samples, the samples read
    twice and the bytes read per byte used, from the stream's own code on tar headers only (a `pipe:` or
    `https://` source is read through, as the run would read it). Prints JSON. The run is a pretraining
    config; it plans 1 epoch unless told `--epochs N`."""
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.data.loading.dry_run import dry_run
    from ssit_dist.data.loading.sources import open_shards

    first = [f"data.shards={json.dumps(shards)}"] if shards else []
    cfg = read_settings(ctx, config, first=first, epochs=1)
    data = cfg.data
    try:
        report = dry_run(
            open_shards(data.shards, data.split),
            world,
            data.workers,
            cfg.global_batch,
            cfg.epochs,
            cfg.micro_batch,
            cfg.steps_per_epoch,
            cfg.seed,
            data.piece_size,
            data.shuffle_buffer,
        )
    except (ShardIndexError, ValueError) as e:  # ConfigError is a ValueError
        fail(str(e))
    print(json.dumps(report, indent=2))
