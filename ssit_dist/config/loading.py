"""Reading run configs: a YAML or JSON file (a path or the name of a shipped config), `section.field=value`
overrides from the command line, the dataclasses of config/schema.py built from both, and the copy saved
into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ssit_dist import atomic
from ssit_dist.config.schema import PretrainConfig
from ssit_dist.fields import ConfigError


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
    """Dataclass `cls` from a dict, recursively, over the section's default `base` where it has one (the
    fields not given keep base's values: augment.view2 is not ViewRecipe()); errors name the dotted field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata["alias"]: f.name for f in fields.values() if f.metadata.get("alias")}
    kwargs = {}
    for key, value in values.items():
        if key in aliases:
            warnings.warn(
                f"config field {where}{key} is now called {where}{aliases[key]}; the old name is read "
                "until the next release",
                FutureWarning,
                stacklevel=2,
            )
            key = aliases[key]
        if key not in fields:
            raise ConfigError(f"unknown field {where}{key} (known: {', '.join(fields)})")
        factory = fields[key].default_factory
        default = factory() if callable(factory) else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a section (a mapping), not {value!r}")
            value = _build(type(default), value, f"{where}{key}.", base=default)
        kwargs[key] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:  # a class names its own fields; here they get the section's dotted path
        raise ConfigError(where + str(e)) from None


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, kind: type = PretrainConfig) -> Any:
    """A `kind` (PretrainConfig or FinetuneConfig) from a YAML/JSON file (a path, or the bare name of a
    shipped config) plus `a.b=value` overrides. A relative `ds_config` path in a file is taken relative
    to that file's folder; a bare name means the shipped DeepSpeed config (see `shipped_ds_config`)."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        shipped = RUN_CONFIGS / f"{path.name}.yaml"
        if not path.is_file() and path.parent == Path(".") and shipped.is_file():
            path = shipped  # a bare name: the shipped config (tiny_cpu, ssit_vit_s, ssit_vit_b)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found (shipped: "
                f"{', '.join(sorted(p.stem for p in RUN_CONFIGS.glob('*.yaml')))})"
            )
        text = path.read_text()
        try:
            values = (json.loads(text) if path.suffix == ".json" else parse_yaml(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections and fields")
        beside = path.parent / str(values.get("ds_config", ""))
        if (
            isinstance(values.get("ds_config"), str)
            and not Path(values["ds_config"]).is_absolute()
            and beside.is_file()
        ):
            values["ds_config"] = str(beside.resolve())  # relative to the file that names it
    for override in overrides or []:
        apply_override(values, override)
    return _build(kind, values, "")


def shipped_ds_config(name: str) -> Path:
    """`name` as given when that file exists; else a bare name (`zero2_bf16`, with or without .json) is
    the shipped DeepSpeed config of that name."""
    path = Path(name)
    shipped = DS_CONFIGS / (name if name.endswith(".json") else f"{name}.json")
    return shipped if not path.is_file() and "/" not in name and shipped.is_file() else path


def save_config(cfg: Any, run_dir: Path) -> Path:
    return atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
