"""`ssit-dist config`: every field of a run config."""

from __future__ import annotations

import json
import typing
from typing import Any

import typer
from rich.table import Table

from ssit_dist.cli.common import console, fail


def show_config(kind: str = typer.Argument("pretrain", help="pretrain, finetune or segment")) -> None:
    """List every config field: name, type, default and what it does."""
    import dataclasses

    from ssit_dist.config import FinetuneConfig, PretrainConfig, SegmentConfig
    from ssit_dist.fields import describe, range_text

    kinds = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "segment": SegmentConfig}
    if kind not in kinds:
        fail(f"config {kind!r}: expected pretrain, finetune or segment", 2)
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
