"""What every command shares: the consoles, failing with a message, config fields as options or overrides,
starting ranks."""

from __future__ import annotations

import os
import typing
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.text import Text

console = Console()


err = Console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "-- img/s", style="cyan")


def launch_ranks(module: str, args: list[str], nproc: int) -> int:
    """`nproc` ranks of the trainer `module` on this machine (ssit_dist/local_launch.py); each takes its
    share of the cores itself (ssit_dist/runtime.py)."""
    from ssit_dist.local_launch import launch

    return launch(module, args, nproc, dict(os.environ))


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def field_option(
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
