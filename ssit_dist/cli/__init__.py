"""The `ssit-dist` command: thin Typer commands, each calling one library function. One file per command
group; this one builds the app and registers them in the order `ssit-dist --help` lists them."""

from __future__ import annotations

import typer

from ssit_dist.cli import config, data, demo, inspect, slurm, train
from ssit_dist.cli.common import flags_as_overrides

__all__ = ["app", "flags_as_overrides"]

# Commands that hand the words they do not declare to a trainer (field=value overrides, --config FILE).
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SSiT pretraining for fundus photographs, at scale.")
app.command()(data.info)
app.command()(data.shard)
app.command(context_settings=PASS_THROUGH)(train.pretrain)
app.command()(train.export)
app.command(context_settings=PASS_THROUGH)(train.finetune)
app.command(context_settings=PASS_THROUGH)(train.segment)
app.command("data-plan")(data.data_plan)
app.command()(inspect.knn)
app.command()(inspect.attention)
app.command()(inspect.plot)
app.command()(demo.demo)
app.command("config")(config.show_config)
app.command("slurm", context_settings=PASS_THROUGH)(slurm.slurm)
