"""The project's map matches the project: README's Layout section names every module and folder that
exists and nothing that does not, and the wheel ships every package of the source tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> list[str]:
    """The first word of every indented line of README's Layout section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^    (\S+)", section, re.MULTILINE)]


def test_readme_layout_names_every_module_and_only_what_exists() -> None:
    named = _layout_paths()
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"README's Layout names paths that do not exist: {missing}"
    modules = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "ssit_dist").rglob("*.py") if p.name not in ("__init__.py",)
    )
    folders = {p.rstrip("/") for p in named if p.endswith("/")}
    unnamed = [m for m in modules if m not in named and not any(m.startswith(f + "/") for f in folders)]
    assert not unnamed, f"modules missing from README's Layout: {unnamed}"


def test_the_wheel_ships_every_package() -> None:
    # Read as text: tomllib is Python 3.11+, and the project supports 3.10.
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    assert block, "pyproject.toml has no [tool.setuptools] packages list"
    listed = set(re.findall(r'"([^"]+)"', block.group(1)))
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ssit_dist").rglob("__init__.py")}
    assert packages <= listed, f"packages not in pyproject.toml's [tool.setuptools] packages: {packages - listed}"


def test_no_function_runs_over_sixty_lines() -> None:
    """A long function is a set-up or loop that should read as its named stages (MAE's main_pretrain);
    sixty lines is where the project draws that line."""
    import ast

    long = []
    for path in sorted((ROOT / "ssit_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in conftest.py and the helper modules; a test module imported by another runs
    its tests' imports twice and ties the two files' fixtures together."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    names = {p.stem for p in tests}
    pattern = re.compile(r"^\s*(?:from|import)\s+(?:tests\.)?(\w+)", re.MULTILINE)
    offenders = [f"{p.name} imports {m}" for p in tests for m in pattern.findall(p.read_text()) if m in names]
    assert not offenders, offenders
