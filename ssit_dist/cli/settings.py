"""One way to set a field on every run command: `--config FILE`, then `key=value` overrides, or the same as
flags (`--run-dir X`, `--workers=4`, `--linear`, `--no-linear`, `--optim.lr 5e-4`). The config class is the
one place that declares a field, its default and its help; a command declares only what is not a field
(`--nproc`, `--output`, its paths)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperCommand

from ssit_dist.cli.common import fail

_OVERRIDE = "overrides"  # ctx.meta key: the words that set fields, in the order typed
_SPELT = "spelt"  # ctx.meta key: {field: the flag that set it}


def _sections(kind: type) -> dict[str, tuple[str, type]]:
    """The fields of config class `kind` by name and older alias: {name: (field path, type)}; a section's
    own fields as `section.field`, so that `--optim.lr` and `--lr` (a name no other field has) find optim.lr."""
    from ssit_dist.configclass import renamed

    hints = typing.get_type_hints(kind)
    found: dict[str, tuple[str, type]] = {}
    for f in dataclasses.fields(kind):
        found[f.name] = (f.name, hints[f.name])
        if dataclasses.is_dataclass(hints[f.name]):
            inner = _sections(hints[f.name]).items()
            found |= {f"{f.name}.{name}": (f"{f.name}.{path}", t) for name, (path, t) in inner}
    return found | {old: found[new] for old, new in renamed(kind).items()}


def _field_of(flag: str, kind: type, spellings: dict[str, str]) -> tuple[str, type]:
    """The field path a `--flag` sets and its type: the command's own older spelling, a field (or its
    alias), or the one field of a section whose last name it is; an unknown or ambiguous flag names the
    choices."""
    name = spellings.get(flag, flag.replace("-", "_"))
    fields = _sections(kind)
    if name in fields:
        return fields[name]
    leaves = sorted({fields[path] for path in fields if path.endswith(f".{name}")})
    if len(leaves) == 1:
        return leaves[0]
    if leaves:
        choices = ", --".join(path for path, _ in leaves)
        raise ValueError(f"option --{flag} is ambiguous in {kind.__name__}: write one of --{choices}")
    top = ", ".join(f.name for f in dataclasses.fields(kind))
    raise ValueError(f"unknown option --{flag}: {kind.__name__} has no field {name} (its fields: {top})")


def flags_as_overrides(args: list[str], kind: type, spellings: dict[str, str] | None = None) -> list[str]:
    """`--run-dir X`, `--out=X` (an alias), `--linear` / `--no-linear` (a bool), `--lr 0.1` (optim.lr) ->
    `run_dir=X`, `linear=true`, `optim.lr=0.1` for config class `kind`; other words pass through. A list
    field given as a flag takes commas: `--k 5,10` -> `ks=[5,10]`. `spellings`: a command's older flag
    names for a field (knn's `--k` for ks)."""
    own, overrides = split_words(args, kind, spellings or {}, {}, {})
    return overrides + own


def settings_command(kind: str, spellings: dict[str, str] | None = None) -> type[TyperCommand]:
    """A Typer command class whose words that are no option of its own set fields of config class `kind`
    ("module:Class", imported when the command runs: ssit_dist.config takes seconds to import, `--help` of
    the other commands should not); `--help` ends with those fields. Register a command with `cls=` this."""

    class SettingsCommand(TyperCommand):
        older_spellings = spellings or {}  # for readers of the command (the README test, the docs)

        def config_class(self) -> type:
            module, _, name = kind.partition(":")
            return getattr(importlib.import_module(module), name)

        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            declared = {o: p for p in self.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
            try:
                ctx.meta[_SPELT] = {}
                own, ctx.meta[_OVERRIDE] = split_words(
                    args, self.config_class(), spellings or {}, declared, ctx.meta[_SPELT]
                )
            except ValueError as e:
                fail(str(e), 2)
            return super().parse_args(ctx, own)

        def format_help(self, ctx: Any, formatter: Any) -> None:
            self.epilog = fields_help(self.config_class(), spellings or {})
            super().format_help(ctx, formatter)

    return SettingsCommand


def split_words(
    args: list[str], kind: type, spellings: dict[str, str], declared: dict[str, Any], spelt: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(the words of the command's `declared` options with their values, its arguments and `--`, the
    overrides: each `key=value` and each `--flag [value]` that is not declared, as `field=value`). `spelt`
    gets each field set by a flag, as the user typed the flag, for the error messages."""
    own: list[str] = []
    overrides: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        option = declared.get(arg.split("=", 1)[0])
        if arg == "--":
            own += [arg, *rest]
            break
        if option is not None or arg == "--help":
            takes_value = not getattr(option, "is_flag", True) and "=" not in arg  # --help: a flag
            own += [arg, *([rest.pop(0)] if takes_value and rest else [])]
        elif arg.startswith("--"):
            overrides.append(_flag_override(arg, rest, kind, spellings))
            spelt[overrides[-1].split("=", 1)[0]] = arg.split("=", 1)[0]
        elif "=" in arg and arg.split("=", 1)[0].replace(".", "_").isidentifier():
            overrides.append(arg)
        else:
            own.append(arg)
    return own, overrides


def _flag_override(arg: str, rest: list[str], kind: type, spellings: dict[str, str]) -> str:
    """`--flag[=value]` as `field=value`, taking its value from `rest` where it is not in `arg`."""
    flag, has_value, value = arg[2:].partition("=")
    negated = flag.startswith("no-") and not has_value
    try:
        field, hint = _field_of(flag, kind, spellings)
    except ValueError:
        if not negated:
            raise
        field, hint = _field_of(flag[3:], kind, spellings)
    if negated and hint is not bool:
        raise ValueError(f"{arg}: {field} is not a yes/no field; write --{flag[3:]} VALUE")
    if hint is bool and not has_value:
        value = "false" if negated else "true"
    elif not has_value:
        if not rest:
            raise ValueError(f"{arg} needs a value")
        value = rest.pop(0)
    if typing.get_origin(hint) is list and not value.lstrip().startswith("["):
        # Numbers take commas (--k 5,10); a text item is one item, as a brace pattern holds commas itself.
        value = json.dumps([value]) if typing.get_args(hint) == (str,) else f"[{value}]"
    return f"{field}={value}"


def read_settings(
    ctx: typer.Context, config: Path | None, first: list[str] | None = None, code: int = 2, **command_defaults: Any
) -> Any:
    """The config the command was given: `config` (a file or a shipped name), then `first` (overrides from
    the command's own arguments), then the words that set fields. `command_defaults`: where the command's
    default differs from the library's (shard packs with every core); it holds unless the words set that
    field, or the file sets it to another value than the library's. A bad file, field or value fails with
    exit `code`, naming the field as the user wrote it and the config class."""
    from ssit_dist.config import ConfigError, load_config

    kind = ctx.command.config_class()  # type: ignore[attr-defined]
    overrides = [*(first or []), *ctx.meta[_OVERRIDE]]
    try:
        cfg = load_config(config, overrides, kind=kind)
        library = load_config(None, [], kind=kind) if command_defaults else None
    except ConfigError as e:
        field, said, problem = str(e).partition(" = ")
        flag = ctx.meta[_SPELT].get(field) if said else None
        fail(f"{kind.__name__}: {f'{flag} {problem}' if flag else e}", code)
    typed = {o.split("=", 1)[0] for o in overrides}
    kept = {k: v for k, v in command_defaults.items() if k not in typed and getattr(cfg, k) == getattr(library, k)}
    return dataclasses.replace(cfg, **kept) if kept else cfg


def trainer_args(ctx: typer.Context, config: Path | None) -> list[str]:
    """What a trainer's `main` parses: `--config FILE` and the overrides, as the command was given them."""
    return (["--config", str(config)] if config else []) + ctx.meta[_OVERRIDE]


def fields_help(kind: type, spellings: dict[str, str]) -> str:
    """The end of a command's `--help`: how fields are set and each top-level field with its default."""
    from ssit_dist.configclass import config_fields, default_of

    older = {field: flag for flag, field in spellings.items()}
    lines = []
    for name, info in config_fields(kind).items():
        default = default_of(info)
        flag = f"--{older.get(name, name).replace('_', '-')}"
        if dataclasses.is_dataclass(default):
            flag, shown = f"--{name}.FIELD", "a section"
        else:
            shown = "required" if default is dataclasses.MISSING else f"default {json.dumps(default)}"
        lines.append(escape(f"  {flag}  {info.description or ''} ({shown})"))
    return (
        "Fields: --config FILE (YAML or JSON, a path or a shipped name), then FIELD=VALUE or --FIELD VALUE "
        f"(--FIELD alone for yes, --no-FIELD for no), later words winning. Those of {kind.__name__}:\n\n"
        + "\n".join(lines)
    )
