"""Reading run configs: a YAML or JSON file (a path or the name of a shipped config), `section.field=value`
overrides from the command line, the config classes of config/schema.py built from both (older field
names read with a FutureWarning), and the copy saved into the run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ssit_dist import atomic
from ssit_dist.configclass import ConfigError, config_fields, default_of, renamed


def _shipped(in_wheel: str, in_source: str) -> Path:
    """The shipped configs: inside the package in an installed wheel, the top-level folders of a
    source checkout (editable install) otherwise."""
    package = Path(__file__).resolve().parents[1]
    return package / in_wheel if (package / in_wheel).is_dir() else package.parent / in_source


DS_CONFIGS = _shipped("ds_configs", "ds_configs")
RUN_CONFIGS = _shipped("configs", "launch/configs")


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: YAML 1.1 reads `5e-4` and `1E-4` (no dot) as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _build(cls: type, values: dict[str, Any], where: str, base: Any = None) -> Any:
    """Config `cls` from a dict over `base` (a section's own defaults: augment.view2 is not ViewRecipe()),
    sections first; errors name the dotted field."""
    fields, old = config_fields(cls), renamed(cls)
    kwargs = {}
    for key, value in values.items():
        if key in old:
            warnings.warn(
                f"config field {where}{key} is now called {where}{old[key]}; the old name is read until the next "
                "release",
                FutureWarning,
                stacklevel=3,
            )
            key = old[key]
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {where}{close[0]}? " if close else ""
            raise ConfigError(f"unknown field {where}{key} ({hint}known: {', '.join(fields)})")
        section = getattr(base, key) if base is not None else default_of(fields[key])
        if dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a section (a mapping), not {value!r}")
            value = _build(type(section), value, f"{where}{key}.", section)
        kwargs[key] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:  # a class names its own fields; here they get the section's dotted path
        lines = [line if line.startswith("unknown") else where + line for line in str(e).splitlines()]
        raise ConfigError("\n".join(lines)) from None


def apply_override(values: dict[str, Any], override: str) -> None:
    """`optim.lr=5e-4` -> values["optim"]["lr"] = 5e-4 (the value is parsed as YAML)."""
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise ConfigError(f"override {override!r} is not FIELD=VALUE (for example optim.lr=5e-4)")
    *parents, leaf = path.strip().split(".")
    target = values
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        target[leaf] = parse_yaml(text)
    except yaml.YAMLError:
        target[leaf] = text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, kind: type | None = None) -> Any:
    """A `kind` (PretrainConfig, the default; FinetuneConfig, ...) from a YAML/JSON file (a path, or the bare
    name of a shipped config) plus `a.b=value` overrides. A bad value names the field, the value, what is
    expected and where it came from (the file or the override)."""
    if kind is None:
        from ssit_dist.config.schema import PretrainConfig  # imports the model: only when asked for

        kind = PretrainConfig
    file = _find(Path(path)) if path else None
    values = _read(file) if file else {}
    for override in overrides or []:
        apply_override(values, override)
    try:
        return _build(kind, values, "")
    except ConfigError as e:
        lines = [_with_source(line, kind, file, overrides or []) for line in str(e).splitlines()]
        raise ConfigError("\n".join(lines)) from None


def _with_source(line: str, kind: type, file: Path | None, overrides: list[str]) -> str:
    """An error line with where its field's value came from: the last override that set it, or the file."""
    field = _FIELD.match(line)
    names = _spellings(field[1], kind) if field else set()
    given = [o for o in overrides if o.partition("=")[0].strip() in names]
    source = f"the override {given[-1]}" if given else str(file) if file else ""
    return f"{line} ({source})" if source else line


_FIELD = re.compile(r"(?:unknown field )?([\w.]+)")  # every error line starts with the field it is about


def _spellings(field: str, kind: type) -> set[str]:
    """`loss.ss_weight` and `loss.saliency_weight`: the ways an override may name a dotted field."""
    *parents, leaf = field.split(".")
    section = kind
    for part in parents:
        info = config_fields(section).get(part)
        section = info.annotation if info is not None and isinstance(info.annotation, type) else section
    prefix = "".join(p + "." for p in parents)
    return {prefix + leaf} | {prefix + old for old, new in renamed(section).items() if new == leaf}


def _find(path: Path) -> Path:
    """`path`, or the shipped config of that bare name (tiny_cpu, ssit_vit_s, ssit_vit_b)."""
    shipped = RUN_CONFIGS / f"{path.name}.yaml"
    if not path.is_file() and path.parent == Path(".") and shipped.is_file():
        return shipped
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RUN_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"config file {path} not found (shipped: {known})")
    return path


def _read(path: Path) -> dict[str, Any]:
    """A config file's mapping. A relative `ds_config` path in it is taken relative to the file's folder;
    a bare name means the shipped DeepSpeed config (see `shipped_ds_config`)."""
    text = path.read_text()
    try:
        values = (json.loads(text) if path.suffix == ".json" else parse_yaml(text)) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections and fields")
    ds_config = values.get("ds_config")
    if isinstance(ds_config, str) and not Path(ds_config).is_absolute() and (path.parent / ds_config).is_file():
        values["ds_config"] = str((path.parent / ds_config).resolve())
    return values


def shipped_ds_config(name: str) -> Path:
    """`name` as given when that file exists; else a bare name (`zero2_bf16`, with or without .json) is
    the shipped DeepSpeed config of that name."""
    path = Path(name)
    shipped = DS_CONFIGS / (name if name.endswith(".json") else f"{name}.json")
    return shipped if not path.is_file() and "/" not in name and shipped.is_file() else path


def save_config(cfg: Any, run_dir: Path) -> Path:
    return atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
