"""Writes the lists in docs/ that the code already holds, so that they cannot drift from it: every
command's usage and options (from the CLI itself, as `--help` prints them) and every config field (from
the config's JSON Schema). `make docs` runs it; tests/test_readme.py fails when a block differs from a
fresh generation.

A block is marked in the Markdown and only its inside is rewritten:

    <!-- generated: command shard -->      (or: commands, config pretrain)
    ...
    <!-- end generated -->
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<what>[^>]+?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _cell(text: str) -> str:
    """Text fit for one table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _commands() -> dict[str, Any]:
    """The `ssit-dist` commands by name, with the click context each renders its help in."""
    import typer

    from ssit_dist.cli import app

    group: Any = typer.main.get_command(app)  # a group: it has commands
    root = group.context_class(group, info_name="ssit-dist")
    out = {}
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        out[name] = (command, command.context_class(command, info_name=name, parent=root))
    return out


def _summary(command: Any) -> str:
    """A command's help as one paragraph per paragraph of its docstring."""
    paragraphs = inspect.cleandoc(command.help or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def commands_index() -> str:
    rows = ["| command | what it does |", "|---|---|"]
    for name, (command, _) in _commands().items():
        first = _summary(command).split("\n\n")[0]
        rows.append(f"| [`ssit-dist {name}`](#ssit-dist-{name}) | {_cell(first)} |")
    return "\n".join(rows) + "\n"


def command_reference(name: str) -> str:
    """Usage, help and one row per argument and option of `ssit-dist NAME`, as its --help has them."""
    command, ctx = _commands()[name]
    usage = re.sub(r"\{([^}]+)\}(\.\.\.)?", lambda m: m[1].upper(), command.get_usage(ctx).removeprefix("Usage: "))
    if command.context_settings.get("allow_extra_args") or config_class(name) is not None:
        usage += " [ARGS]..."
    lines = ["    " + usage, "", _summary(command), ""]
    records = [r for r in (p.get_help_record(ctx) for p in command.get_params(ctx)) if r]

    lines += ["| argument or option | what it does |", "|---|---|"]
    for spelling, help_text in records:
        lines.append(f"| `{_cell(spelling)}` | {_cell(help_text)} |")
    cls = config_class(name)
    if cls is not None:
        table = next(n for n in config_names() if config_class(n) is cls)
        lines.append(f"| any field, as `field=value` or a flag | every field of [its config](config.md#{table}) |")
    return "\n".join(lines) + "\n"


def config_class(name: str) -> type | None:
    """The config class whose fields command NAME takes as `--field value` or `field=value`, if any."""
    command, _ = _commands()[name]
    return command.config_class() if hasattr(command, "config_class") else None


def config_names() -> list[str]:
    """The commands that have a config class of their own (data-plan reads pretrain's): one table each."""
    names: dict[type, str] = {}
    for name in _commands():
        cls = config_class(name)
        if cls is not None and cls not in names:
            names[cls] = name
    return list(names.values())


def _resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A property with its `$ref` (or pydantic's `allOf: [$ref]`) replaced by the definition it names."""
    ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("allOf", []) if "$ref" in p), None)
    if ref is None:
        return prop
    return {**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in prop.items() if k not in ("$ref", "allOf")}}


def _type_text(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """`integer, at least 1`, `number or null`, `one of cpu, gpu`: a schema type as a user reads it."""
    prop = _resolve(prop, defs)
    if "anyOf" in prop:
        text = " or ".join(_type_text(p, defs) for p in prop["anyOf"])
    elif "enum" in prop:
        text = "one of " + ", ".join(map(str, prop["enum"]))
    elif "const" in prop:
        text = json.dumps(prop["const"])
    elif prop.get("type") == "array":
        text = "list of " + _type_text(prop.get("items", {}), defs) if prop.get("items") else "list"
    elif prop.get("type") == "object" and isinstance(prop.get("additionalProperties"), dict):
        text = "mapping of " + _type_text(prop["additionalProperties"], defs)
    else:
        text = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "object": "mapping"}.get(
            prop.get("type", ""), prop.get("type", "any value")
        )
    bounds = [
        f"{word} {prop[key]:g}"
        for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
        if key in prop
    ]
    return ", ".join([text, *bounds])


def _field_rows(schema: dict[str, Any], defs: dict[str, Any], prefix: str, defaults: dict[str, Any]) -> list[str]:
    """One row per field; a section's fields under its dotted name, with the defaults the enclosing
    config gives them (augment.view2 differs from view1's class defaults)."""
    rows = []
    for name, raw in schema.get("properties", {}).items():
        prop = _resolve(raw, defs)
        default = defaults.get(name, prop.get("default", raw.get("default")))
        if prop.get("type") == "object" and "properties" in prop:
            rows += _field_rows(prop, defs, f"{prefix}{name}.", default if isinstance(default, dict) else {})
            continue
        shown = "(required)" if name in schema.get("required", []) and name not in defaults else json.dumps(default)
        help_text = raw.get("description") or prop.get("description", "")
        kind = "older name, still read" if raw.get("deprecated") else _type_text(raw, defs)
        shown = "" if raw.get("deprecated") else f"`{_cell(shown)}`"
        rows.append(f"| `{prefix}{name}` | {_cell(kind)} | {shown} | {_cell(help_text)} |")
    return rows


def config_reference(name: str) -> str:
    """Every field of command NAME's config: dotted name, type and range, default, what it does."""
    from ssit_dist.config import json_schema

    cls = config_class(name)
    if cls is None:
        raise ValueError(f"ssit-dist {name} has no config class: no table for it")
    schema = json_schema(cls)
    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    return "\n".join(rows + _field_rows(schema, schema.get("$defs", {}), "", {})) + "\n"


def render(what: str) -> str:
    kind, _, name = what.partition(" ")
    if kind == "commands":
        return commands_index()
    if kind == "command":
        return command_reference(name)
    if kind == "config":
        return config_reference(name)
    raise ValueError(f"unknown generated block {what!r}: expected commands, command NAME or config KIND")


def regenerate(text: str) -> str:
    """TEXT with every generated block's inside written afresh."""
    return BLOCK.sub(lambda m: m[1] + render(m["what"].strip()) + m[4], text)


def main(argv: list[str]) -> int:
    """Rewrite the blocks; with --check, only say which files differ (exit 1)."""
    stale = []
    for path in markdown_files():
        text = path.read_text()
        fresh = regenerate(text)
        if fresh != text:
            stale.append(path.relative_to(ROOT))
            if "--check" not in argv:
                path.write_text(fresh)
    verb = "differ from a fresh generation (run `make docs`)" if "--check" in argv else "rewritten"
    print(f"{', '.join(map(str, stale))}: {verb}" if stale else "docs: every generated block is current")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
