"""The run configs as JSON Schema (draft 2020-12), from the same pydantic fields the loader checks: an
editor that reads the `# yaml-language-server: $schema=...` line of a config file completes and checks
its fields as a user types (launch/configs/schema/ holds them, written by `ssit-dist config X --schema`).

What the schema adds to pydantic's own: no per-field titles (the description is the help), the defaults
that come from a factory (a section's own values: augment.view2 is not augment.view1), and each older
field name as a deprecated property, as the loader still reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from ssit_dist.config.schema import FinetuneConfig, PretrainConfig, SegmentConfig
from ssit_dist.configclass import ConfigError, config_fields, default_of, renamed

DRAFT = "https://json-schema.org/draft/2020-12/schema"
KINDS: dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "segment": SegmentConfig}


class _Untitled(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema(kind: type | str) -> dict[str, Any]:
    """The JSON Schema of a config class, or of a run config by name: pretrain, finetune or segment."""
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ConfigError(f"config kind {kind!r}: expected one of {', '.join(KINDS)}")
        kind = KINDS[kind]
    schema = TypeAdapter(kind).json_schema(schema_generator=_Untitled)
    _complete(schema, kind, schema.get("$defs", {}))
    return {"$schema": DRAFT, **schema}


def _complete(node: dict[str, Any], cls: type, defs: dict[str, Any]) -> None:
    """Factory defaults and deprecated older names for `cls`'s node, then for its sections' nodes."""
    properties = node["properties"]
    for name, info in config_fields(cls).items():
        if info.default_factory is not None:
            default = default_of(info)
            section = dataclasses.is_dataclass(default) and not isinstance(default, type)
            properties[name]["default"] = dataclasses.asdict(default) if section else default
        if isinstance(info.annotation, type) and dataclasses.is_dataclass(info.annotation):
            _complete(defs[properties[name]["$ref"].rsplit("/", 1)[-1]], info.annotation, defs)
    for old, new in renamed(cls).items():
        properties[old] = {**properties[new], "deprecated": True, "description": f"older name of {new}: write {new}"}
