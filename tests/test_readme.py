"""The README and docs/, checked where a machine can check it: every `ssit-dist` command, option and field
they write exists (asked of the CLI and the config loader themselves), every path, module, link and
anchor they name exists, every `make` target they name is in the Makefile, and the option and field
tables that docs/generate.py writes equal a fresh generation. The prose is read by people; this keeps its
code honest."""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer

from conftest import invoke_cli
from ssit_dist.cli import app
from ssit_dist.config import ConfigError, FinetuneConfig, PretrainConfig, SegmentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
# The trainers whose extra arguments are field=value overrides (and, for the Accelerate ones, --field flags).
TRAINERS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "segment": SegmentConfig}
# Top-level entries a path in the README may start with; others (runs/, demo_out/, /data) are what its
# commands write or a user's own.
PROJECT_PATHS = re.compile(r"^(ssit_dist|launch|ds_configs|tests|bench|shards|docs|\.ci)(/[\w.@-]*)*/?$")
ROOT_FILES = {"Makefile", "README.md", "pyproject.toml", "requirements.lock", "LICENSE"}
FILE_SUFFIXES = {"safetensors", "json", "yaml", "pt", "pth", "bin", "png", "csv", "md", "py", "tar"}


@dataclass(frozen=True)
class Code:
    heading: str  # the section it is in
    text: str  # an inline code span, or one line of a code block (continuation lines joined)


def _generator():  # type: ignore[no-untyped-def]
    """docs/generate.py, imported by path: docs/ is no package."""
    if "ssit_docs_generate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ssit_docs_generate", ROOT / "docs" / "generate.py")
        assert spec and spec.loader
        sys.modules["ssit_docs_generate"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["ssit_docs_generate"]


def all_code() -> Iterator[tuple[Path, Code]]:
    """Every code span and code-block line of the README and of every page of docs/, with its file."""
    for page in PAGES:
        yield from ((page, code) for code in code_in(page.read_text()))


def code_in(markdown: str) -> Iterator[Code]:
    """Inline code spans (a span may wrap lines) and code-block lines (indented 4, after a blank line)."""
    heading, paragraph, block, previous_blank = "", [], [], True
    for line in markdown.splitlines() + [""]:
        indented = line.startswith("    ") and bool(line.strip())
        if block and (indented or not line.strip()):  # a block runs until text that is not indented
            block += [line.strip()] if indented else []
            continue
        if block:
            yield from (Code(heading, text) for text in _block_lines(block))
            block = []
        if indented and previous_blank and not paragraph:
            block = [line.strip()]
            continue
        if line.startswith("#") or not line.strip():
            yield from (Code(heading, span) for span in re.findall(r"`([^`]+)`", " ".join(paragraph)))
            paragraph = []
            heading = line.lstrip("#").strip() if line.startswith("#") else heading
        else:
            paragraph.append(line.strip())
        previous_blank = not line.strip()


def _block_lines(lines: list[str]) -> list[str]:
    """A code block's commands: lines ending in `\\` joined with the next."""
    out, current = [], ""
    for line in lines:
        current += line.removesuffix("\\") + " "
        if not line.endswith("\\"):
            out.append(" ".join(current.split()))
            current = ""
    return out + ([current.strip()] if current.strip() else [])


def invocations(code: Code) -> Iterator[list[str]]:
    """The words after each `ssit-dist` (or `.venv/bin/ssit-dist`) up to the end of its command."""
    words = code.text.split()
    for i, word in enumerate(words):
        if word.strip("`'\"").split("/")[-1] == "ssit-dist":
            rest = []
            for w in words[i + 1 :]:
                if w in ("|", ";", "&&", "(or") or w.startswith("#"):
                    break
                rest.append(w)
            yield rest


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}  # type: ignore[misc]


def _options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


def _unknown_options(name: str, words: list[str], commands: dict[str, click.Command]) -> list[str]:
    """The option words that `ssit-dist NAME` does not take (declared, or a trainer's field flags)."""
    known, unknown = _options(commands[name]), []
    for word in words:
        option = word.strip("[]'\"").split("=")[0]
        if not option.startswith("-") or option in known or option in ("-", "--"):
            continue
        if _sets_a_field(commands[name], name, option):
            continue
        unknown.append(option)
    return unknown


def _sets_a_field(command: click.Command, name: str, option: str) -> bool:
    """`--run-dir` on a command that takes its config's fields as flags, asked of the command's own parser:
    it exits naming a flag that is no field (its older spellings, knn's `--k`, included)."""
    if not hasattr(command, "config_class"):
        return False
    try:
        command.parse_args(command.context_class(command, info_name=name), [option, "1"])
    except typer.Exit:
        return False
    except Exception as e:  # a usage error past the flags (INPUT missing): the flag itself was taken
        if not any(c.__name__ == "UsageError" for c in type(e).__mro__):
            raise
    return True


def _unknown_fields(name: str, words: list[str]) -> list[str]:
    """The `field=value` words that are no field of trainer NAME's config (the loader's own check)."""
    unknown = []
    for word in words:
        word = word.strip("[]'\"")
        field, sep, _ = word.partition("=")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_.]*", field):
            continue
        try:
            with warnings.catch_warnings():  # an old name is read with a deprecation warning: it exists
                warnings.simplefilter("ignore")
                load_config(None, [f"{field}=null"], TRAINERS[name])
        except ConfigError as e:
            if "unknown field" in str(e):
                unknown.append(field)
    return unknown


def test_every_ssit_dist_command_option_and_field_the_readme_writes_exists() -> None:
    commands = _commands()
    problems: list[str] = []
    seen = 0
    for page, code in all_code():
        for words in invocations(code):
            if not words or words[0].startswith(("-", "[")):
                continue
            seen += 1
            names = words[0].strip("`'\"").split("|")
            if any(n not in commands for n in names):
                problems.append(f"{page.name}: {code.heading}: `ssit-dist {' '.join(words)}`: no command {words[0]}")
                continue
            for name in names:
                args = words[1:]
                if name == "slurm":  # `ssit-dist slurm pretrain|finetune [options] ARGS`: ARGS go to the trainer
                    trainers = args[0].split("|") if args else []
                    problems += [f"`ssit-dist slurm {t}`: no trainer {t}" for t in trainers if t not in TRAINERS]
                    for trainer in (t for t in trainers if t in TRAINERS):
                        rest = [w for w in args[1:] if w.strip("[").split("=")[0] not in _options(commands["slurm"])]
                        problems += [f"{code.text}: {o}" for o in _unknown_options(trainer, rest, commands)]
                        problems += [f"{code.text}: {f}" for f in _unknown_fields(trainer, rest)]
                    continue
                problems += [f"{code.text}: no option {o} of {name}" for o in _unknown_options(name, args, commands)]
                if name in TRAINERS:
                    problems += [f"{code.text}: no field {f} of {name}" for f in _unknown_fields(name, args)]
                if name == "config" and args and not args[0].startswith(("-", "(")):
                    if invoke_cli("config", args[0].strip("`"), check=False).exit_code != 0:
                        problems.append(f"{code.text}: `ssit-dist config {args[0]}` fails")
    assert seen > 40, f"only {seen} ssit-dist commands found: are the README and docs/ parsed?"
    assert not problems, "\n".join(problems)


def test_every_option_in_a_command_section_exists() -> None:
    """A lone `--option` span in a section about `ssit-dist CMD` is an option (or a field's flag) of CMD, or
    where the heading names no one command, of some command."""
    commands = _commands()
    problems = []
    for page, code in all_code():
        if not code.heading.startswith("`ssit-dist ") or not code.text.startswith("--"):
            continue
        option = code.text.split()[0].split("=")[0]
        named = code.heading.split()[1].strip("`,:")
        candidates = [named] if named in commands else list(commands)
        if all(_unknown_options(name, [option], commands) for name in candidates):
            problems.append(f"{page.name}: {code.heading}: `{code.text}`: no ssit-dist command takes {option}")
    assert not problems, "\n".join(problems)


def _wheel_paths() -> dict[str, str]:
    """`ssit_dist/configs` -> `launch/configs`: folders that are packages only inside the wheel (read as
    text, like test_layout: tomllib is Python 3.11+)."""
    line = re.search(r"^package-dir = \{(.*)\}", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line, "pyproject.toml has no [tool.setuptools] package-dir"
    return {package.replace(".", "/"): folder for package, folder in re.findall(r'"([\w.]+)" = "([\w/]+)"', line[1])}


def _named_paths(page: Path) -> Iterator[tuple[str, str]]:
    """Paths in code (from the project's root) and the files of relative links (from the page's folder),
    both as paths from the root."""
    markdown = page.read_text()
    for code in code_in(markdown):
        for word in code.text.split():
            word = word.strip("`'\"[](),;:")
            if PROJECT_PATHS.match(word) or word in ROOT_FILES:
                yield f"{page.name}: {code.heading}", word
    for target, _ in _links(markdown):
        if target:
            yield f"{page.name}: link", (page.parent / target).resolve().relative_to(ROOT).as_posix()


def _links(markdown: str) -> list[tuple[str, str]]:
    """(file, anchor) of every relative link: `[a](docs/x.md#y)`, `[b](#y)` (file ''), `[c](docs/)`."""
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown)
    return [tuple(t.partition("#")[::2]) for t in targets if not t.startswith(("http://", "https://"))]  # type: ignore[misc]


def test_every_project_path_the_readme_and_docs_name_exists() -> None:
    wheel = _wheel_paths()
    problems, seen = [], 0
    for heading, path in (named for page in PAGES for named in _named_paths(page)):
        first = path.split("/")[0]
        if first == "shards" and path.rstrip("/") not in ("shards", "shards/README.md"):
            continue  # the folders under shards/ are what the README's `ssit-dist shard` commands write
        for package, folder in wheel.items():  # a package only the wheel has, e.g. ssit_dist/configs
            if path.rstrip("/") == package or path.startswith(package + "/"):
                path = folder + path[len(package) :]
        seen += 1
        if not (ROOT / path).exists():
            problems.append(f"{heading}: {path}")
    assert seen > 50, f"only {seen} paths found: are the README and docs/ parsed?"
    assert not problems, "README or docs/ name paths that do not exist:\n" + "\n".join(problems)


def _defines(source: str, name: str) -> bool:
    """Defined there, or re-exported there explicitly (`from ... import name as name`)."""
    pattern = rf"^(?:def|class|async def) {name}\b|^{name}\s*[:=]|\bimport {name} as {name}$"
    return re.search(pattern, source, re.M) is not None


def test_every_module_and_function_the_readme_and_docs_name_exists() -> None:
    """`ssit_dist.models.batchnorm.convert_batchnorm(module)`: the module file exists and defines the name."""
    problems, seen = [], 0
    for _, code in all_code():
        for dotted in re.findall(r"\bssit_dist(?:\.\w+)+", code.text):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                base = ROOT / Path(*parts[:cut])
                module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                if module.is_file():
                    break
            else:
                problems.append(f"{code.heading}: {dotted}: no such module")
                continue
            seen += 1
            if cut < len(parts) and not _defines(module.read_text(), parts[cut]):
                problems.append(f"{code.heading}: {dotted}: {module.relative_to(ROOT)} defines no {parts[cut]}")
    assert seen > 15 and not problems, "\n".join(problems)


def _anchor(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_link_and_anchor_resolves() -> None:
    """A link to a page's #anchor names one of its headings; a link to a file names one that exists."""
    problems, anchored = [], 0
    for page in PAGES:
        for target, anchor in _links(page.read_text()):
            file = (page.parent / target).resolve() if target else page
            if not file.exists():
                problems.append(f"{page.name}: ({target}): no such file")
            elif anchor:
                anchored += 1
                if file.suffix != ".md" or anchor not in _anchors(file):
                    problems.append(f"{page.name}: ({target}#{anchor}): {file.name} has no such heading")
    assert anchored > 10, f"only {anchored} links to an anchor found: are the README and docs/ parsed?"
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_page_of_docs() -> None:
    linked = {(README.parent / target).resolve() for target, _ in _links(README.read_text()) if target}
    assert DOCS and not [p.name for p in DOCS if p not in linked], "pages of docs/ the README does not link"


def test_every_make_target_named_exists() -> None:
    targets = set(re.findall(r"^([\w.-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))
    named = {
        words[words.index("make") + 1]
        for _, code in all_code()
        for words in [code.text.split()]
        if "make" in words[:-1] and "=" not in words[words.index("make") + 1]
    }
    assert len(named) >= 6, named
    assert named <= targets, f"make targets the README or docs/ name but the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.parametrize(
    "markdown, found",
    [
        ("Run `ssit-dist shard A B --size 64` now.", ["ssit-dist shard A B --size 64"]),
        ("A span that `wraps\nacross lines` here.", ["wraps across lines"]),
        ("text\n\n    ssit-dist pretrain \\\n        --nproc 2\n\nafter", ["ssit-dist pretrain --nproc 2"]),
    ],
)
def test_the_readme_parser_finds_spans_and_joined_block_lines(markdown: str, found: list[str]) -> None:
    assert [c.text for c in code_in(markdown)][-len(found) :] == found


def test_the_generated_tables_equal_a_fresh_generation() -> None:
    """A changed option or config field without `make docs` fails here, naming the page."""
    generate = _generator()
    stale = [page.name for page in PAGES if generate.regenerate(page.read_text()) != page.read_text()]
    assert not stale, f"generated blocks differ from the code in {stale}: run `make docs`"


def test_the_docs_list_every_command_and_every_config() -> None:
    """A new command or config gets its table: docs/commands.md has a block per command, docs/config.md one
    per config kind."""
    blocks = {m["what"].strip() for page in DOCS for m in _generator().BLOCK.finditer(page.read_text())}
    wanted = {f"command {name}" for name in _commands()} | {f"config {k}" for k in _generator().config_names()}
    assert not wanted - blocks, f"no generated table for {sorted(wanted - blocks)}"


def _documented_fields() -> dict[str, set[str]]:
    """The fields of each config kind, from the generated tables of docs/config.md (fresh: the test above)."""
    blocks = _generator().BLOCK.finditer((ROOT / "docs" / "config.md").read_text())
    return {
        m["what"].split()[1]: set(re.findall(r"^\| `([\w.]+)` \|", m["body"], re.M))
        for m in blocks
        if m["what"].startswith("config ")
    }


def _known_field(name: str, fields: dict[str, set[str]]) -> bool:
    """A field of some config, or an old name its loader still reads (in a section that config has)."""
    if any(name in names for names in fields.values()):
        return True
    section = name.split(".")[0] + "." if "." in name else ""
    return any(
        not _unknown_fields(kind, [f"{name}=x"])
        for kind in TRAINERS
        if not section or any(f.startswith(section) for f in fields[kind])
    )


def test_every_config_field_named_exists() -> None:
    """`data.augment_on`, `model.saliency=false`, `resume=force` in prose: a field of some config (or an old
    name the loader still reads)."""
    fields = _documented_fields()
    assert set(TRAINERS) <= set(fields), f"docs/config.md has tables for {sorted(fields)} only"
    sections = {f.split(".")[0] for names in fields.values() for f in names if "." in f}
    assert {"data", "model", "optim"} <= sections, sections
    problems, seen = [], 0
    for page, code in all_code():
        name, sep, value = code.text.partition("=")
        # api.md's `model.online` is a Python attribute; `field=value` a placeholder; `x=True` Python.
        dotted = re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", name) and name.split(".")[0] in sections
        dotted = dotted and page.name != "api.md" and name.rsplit(".", 1)[1] not in FILE_SUFFIXES
        assignment = sep and re.fullmatch(r"[a-z_][a-z0-9_.]*", name) and " " not in code.text
        assignment = assignment and value not in ("True", "False", "value")
        if not (dotted or assignment) or code.text.startswith(("ssit_dist.", "-")):
            continue
        seen += 1
        if not _known_field(name, fields):
            problems.append(f"{page.name}: {code.heading}: `{code.text}`: no config has a field {name}")
    assert seen > 20, f"only {seen} field names found: are the README and docs/ parsed?"
    assert not problems, "\n".join(problems)
