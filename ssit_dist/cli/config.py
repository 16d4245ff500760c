"""`ssit-dist config`: every field of a run config, or its JSON Schema (`--schema`)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from ssit_dist.cli.common import console, fail

KINDS = "pretrain, finetune, segment or knn"


def show_config(
    kind: str = typer.Argument("pretrain", help=KINDS),
    schema: bool = typer.Option(False, "--schema", help="Print the JSON Schema (for editors and validators)."),
) -> None:
    """List every config field: name, type, default and what it does; or print its JSON Schema."""
    from ssit_dist.config import ConfigError, json_schema
    from ssit_dist.config.editor_schema import KINDS as RUN_KINDS
    from ssit_dist.eval.knn import KnnConfig

    config = {**RUN_KINDS, "knn": KnnConfig}.get(kind)
    if config is None:
        fail(f"config {kind!r}: expected {KINDS}", 2)
    if schema:
        try:
            print(json.dumps(json_schema(config), indent=2))
        except ConfigError as e:
            fail(str(e), 2)
        return
    table = Table("field", "type", "default", "what it does", box=None, highlight=False)
    for row in field_rows(config):
        table.add_row(*row)
    console.print(table)


def field_rows(config: type, prefix: str = "", base: Any = None) -> list[tuple[str, str, str, str]]:
    """(dotted name, type and range, default, help) of every field, a section's under its name with the
    section's own defaults (augment.view2's are not view1's)."""
    import dataclasses

    from ssit_dist.configclass import bounds, config_fields, default_of, describe, range_text, renamed

    older = {new: old for old, new in renamed(config).items()}
    rows = []
    for name, info in config_fields(config).items():
        default = getattr(base, name) if base is not None else default_of(info)
        if dataclasses.is_dataclass(default):
            rows += field_rows(type(default), f"{prefix}{name}.", default)
            continue
        limits = bounds(info)
        kind = describe(info.annotation) + (f", {range_text(limits)}" if limits else "")
        shown = "required" if default is dataclasses.MISSING else json.dumps(default)
        was = f" (was {older[name]})" if name in older else ""
        rows.append((prefix + name, kind, shown, (info.description or "") + was))
    return rows
