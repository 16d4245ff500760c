"""The project's map matches the project: README's Layout section names every module and folder that
exists and nothing that does not, and the wheel ships every package of the source tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> list[str]:
    """The first word of every indented line of docs/layout.md, the project's map."""
    text = (ROOT / "docs" / "layout.md").read_text()
    return [m.group(1) for m in re.finditer(r"^    (\S+)", text, re.MULTILINE)]


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
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    names = {p.stem for p in tests}
    pattern = re.compile(r"^\s*(?:from|import)\s+(?:tests\.)?(\w+)", re.MULTILINE)
    offenders = [f"{p.name} imports {m}" for p in tests for m in pattern.findall(p.read_text()) if m in names]
    assert not offenders, offenders


def _imports(path: Path) -> set[str]:
    """Every ssit_dist module a file imports, at the top or inside a function ("from a.b import c" counts
    a.b and, where it exists, the module a.b.c)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssit_dist"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ssit_dist"))
    return found


def _package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / "ssit_dist").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


# The flow, lowest first: a module may import from its own layer and the layers before it, never after.
# Modules at the package's top level are the base every layer uses (atomic writes, process groups,
# stopping); the launcher, demo and CLI sit on top.
LAYERS = [
    "ssit_dist",
    "ssit_dist.data",
    "ssit_dist.data.packing",
    "ssit_dist.data.loading",
    "ssit_dist.models",
    "ssit_dist.config",
    "ssit_dist.eval",
    "ssit_dist.train",
    "ssit_dist.local_launch ssit_dist.demo",
    "ssit_dist.cli ssit_dist.__main__",
]


def _layer(module: str) -> int:
    """The deepest layer whose name is the module or a package above it."""
    best, depth = 0, 0
    for rank, names in enumerate(LAYERS):
        for name in names.split():
            if (module == name or module.startswith(name + ".")) and name.count(".") >= depth:
                best, depth = rank, name.count(".")
    return best


def test_no_import_runs_back_up_the_flow() -> None:
    modules = _package_modules()
    upward = [
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in sorted(_imports(path) & modules.keys())
        if _layer(target) > _layer(name)
    ]
    assert not upward, "imports against the flow (LAYERS in this file):\n" + "\n".join(upward)


def test_every_package_module_is_used_by_the_product() -> None:
    """A module only bench/ or tests/ import is not part of the product: it belongs with them. Used means
    reached from an entry point (the console script, `python -m ssit_dist`, `python -m ssit_dist.train`,
    launch/) through imports or module names that start ranks (`python -m ssit_dist.train.segment`)."""
    import ast

    modules = _package_modules()
    named = {
        node.value
        for path in modules.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules
    }
    reached = {"ssit_dist.cli", "ssit_dist.__main__", "ssit_dist.train.__main__"} | named
    for path in (ROOT / "launch").rglob("*.py"):
        reached |= _imports(path) & modules.keys()
    todo = list(reached)
    while todo:
        for target in _imports(modules[todo.pop()]) & modules.keys():
            parents = [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 1)]
            for module in [target, *parents]:
                if module in modules and module not in reached:
                    reached.add(module)
                    todo.append(module)
    unused = sorted(name for name, path in modules.items() if path.name != "__init__.py" and name not in reached)
    assert not unused, f"package modules no entry point reaches (move them to bench/ or use them): {unused}"
