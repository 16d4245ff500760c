"""The `ssit-dist` command: thin Typer commands, each calling one library function. One file per command
group; this one builds the app and registers them in the order `ssit-dist --help` lists them. A command
that runs something takes its settings one way (cli/settings.py): `--config FILE`, then `field=value` or
`--field value`, for the fields of its config class."""

from __future__ import annotations

import typer

from ssit_dist.cli import config, data, demo, evaluate, inspect, predict, slurm, train
from ssit_dist.cli.settings import flags_as_overrides, settings_command

__all__ = ["app", "flags_as_overrides"]

# slurm hands the words it does not declare to the trainer's sbatch script.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SSiT pretraining for fundus photographs, at scale.")
app.command()(data.info)
app.command(cls=settings_command("ssit_dist.data.packing.options:ShardOptions"))(data.shard)
app.command(cls=settings_command("ssit_dist.config:PretrainConfig"))(train.pretrain)
app.command()(train.export)
app.command(cls=settings_command("ssit_dist.config:FinetuneConfig"))(train.finetune)
app.command(cls=settings_command("ssit_dist.config:SegmentConfig"))(train.segment)
app.command("data-plan", cls=settings_command("ssit_dist.config:PretrainConfig"))(data.data_plan)
app.command(cls=settings_command("ssit_dist.eval.knn:KnnConfig", {"k": "ks"}))(inspect.knn)
app.command(cls=settings_command("ssit_dist.eval.evaluate:EvaluateConfig"))(evaluate.evaluate)
app.command()(predict.predict)
app.command(cls=settings_command("ssit_dist.sections:EncoderSource"))(inspect.attention)
app.command()(inspect.plot)
app.command()(demo.demo)
app.command("config")(config.show_config)
app.command("slurm", context_settings=PASS_THROUGH)(slurm.slurm)
