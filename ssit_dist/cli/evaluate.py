"""`ssit-dist evaluate`: patient-grouped cross-validation of encoders' frozen features, with intervals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssit_dist import atomic
from ssit_dist.cli.common import CONFIG_OPTION, console, err, fail
from ssit_dist.cli.settings import read_settings


def evaluate(
    ctx: typer.Context,
    encoders: list[str] = typer.Argument(
        ...,
        metavar="ENCODER...",
        help="Encoders: an `ssit-dist export` .safetensors, a timm folder, a reference checkpoint, timm "
        "weights, or random.",
    ),
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help="Labelled shard folder (every split); repeat for more. Where a set holds both eyes of a patient, "
        "pack it with `ssit-dist shard --labels CSV --group-by patient`: a patient's photographs then share a fold.",
    ),
    config: Path | None = CONFIG_OPTION,
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the JSON here (default: stdout)."),
) -> None:
    """Judge encoders by their frozen features on labelled shards: patient-grouped, grade-stratified
    cross-validation of a kNN and a logistic-probe read-out, patient-bootstrap 95% intervals of QWK,
    referable-DR AUC and accuracy, paired differences with verdicts, against the pixel floors and chance.
    Prints the JSON report (or writes it to --output) and a summary table (on stderr beside the JSON)."""
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.eval.evaluate import evaluate_encoders
    from ssit_dist.models.pretrained import EncoderInitError

    given = [f"encoders={json.dumps(encoders)}", f"data={json.dumps([str(d) for d in data])}"]
    try:
        report = evaluate_encoders(read_settings(ctx, config, given))
    except (ShardIndexError, EncoderInitError, ValueError, OSError) as e:  # ConfigError is a ValueError
        fail(str(e))
    if output:
        atomic.write_json(output, report)
    else:
        print(json.dumps(report, indent=1))
    print_summary(report, console if output else err)  # stdout carries the JSON alone
    if output:
        console.print(f"wrote {output}", markup=False)


JUDGED = {"qwk": "QWK", "referable_auc": "AUC"}  # the endpoints a verdict is given for (crossval.JUDGED)


def print_summary(report: dict[str, Any], to: Console) -> None:
    """Each method's read-outs on all training patients, chance, and the judged differences' verdicts."""
    protocol = report["protocol"]
    table = Table(
        title=f"{protocol['samples']} photographs of {protocol['patients']} patients, {protocol['folds']} "
        f"patient-grouped folds, 95% patient-bootstrap intervals"
    )
    for column in ("method", "read-out", "QWK", "referable AUC", "accuracy"):
        table.add_column(column)

    def cell(entry: dict[str, Any]) -> str:
        low, high = entry["ci95"]
        return "n/a" if entry["value"] is None else f"{entry['value']:.3f} [{low:.2f}, {high:.2f}]"

    rows = [(m, v, e) for m, variants in report["methods"].items() for v, e in variants.items() if "pct" not in v]
    for method, variant, entry in [*rows, ("chance", "grade mix", report["chance"])]:
        table.add_row(method, variant, *(cell(entry[e]) for e in ("qwk", "referable_auc", "accuracy")))
    to.print(table)
    for pair, variants in report["differences"].items():
        for variant in ("knn", "probe"):
            said = "; ".join(f"{name}: {variants[variant][e]['verdict']}" for e, name in JUDGED.items())
            to.print(f"{escape(pair)} ({variant}) {escape(said)}", highlight=False)
    if report["missing"]:
        to.print(f"[yellow]left out (did not decode):[/] {escape(', '.join(report['missing']))}")
