"""The collective-device rule, made structural: under NCCL a collective on a CPU tensor raises, and that
cannot be seen failing on a CPU machine. So every collective the project calls itself lives in
ssit_dist/dist.py, whose helpers take the engine's device; this test reads the package's source and fails
if a collective is called anywhere else, or if a helper builds a tensor without naming its device."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssit_dist"
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "scatter",
    "gather",
    "gather_object",
    "scatter_object_list",
    "send",
    "recv",
    "wait_for_everyone",
    "gather_for_metrics",
    "pad_across_processes",
}
# Receivers whose methods of these names are collectives (a tensor's own .gather is not).
DISTRIBUTED = {"torch_dist", "dist", "distributed", "dist_fn", "accelerator", "cdb", "comm"}
TENSOR_FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange"}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _receiver(func: ast.Attribute) -> str:
    value = func.value
    return value.attr if isinstance(value, ast.Attribute) else value.id if isinstance(value, ast.Name) else ""


def offending_calls(source: str) -> list[str]:
    """Collective calls in `source` (a module that is not dist.py), as `line: call`."""
    tree = ast.parse(source)
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and ("distributed" in node.module or node.module.startswith("accelerate"))
        for alias in node.names
        if alias.name in COLLECTIVES
    }
    found = []
    for call in _calls(tree):
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and _receiver(func) in DISTRIBUTED:
            found.append(f"{call.lineno}: {ast.unparse(func)}")
        elif isinstance(func, ast.Name) and func.id in imported:
            found.append(f"{call.lineno}: {func.id}")
    return found


def test_no_module_but_dist_calls_a_collective() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): calls
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "dist.py" and (calls := offending_calls(path.read_text()))
    }
    assert not offenders, f"collectives outside ssit_dist/dist.py (use its helpers, which take the device): {offenders}"


def test_dist_helpers_build_every_tensor_on_a_named_device() -> None:
    tree = ast.parse((PACKAGE / "dist.py").read_text())
    unplaced = [
        f"{call.lineno}: {ast.unparse(call)}"
        for call in _calls(tree)
        if isinstance(call.func, ast.Attribute)
        and call.func.attr in TENSOR_FACTORIES
        and _receiver(call.func) == "torch"
        and not any(k.arg == "device" for k in call.keywords)
    ]
    assert not unplaced, f"tensors built in dist.py without a device: {unplaced}"


def test_the_checker_catches_what_it_is_for() -> None:
    # A collective on a tensor built on the spot, as the pretraining loop once had; Accelerate's
    # reduce of a CPU tensor; an imported helper; and what is not a collective.
    source = (
        "import torch\nimport torch.distributed as torch_dist\nfrom accelerate.utils import gather_object\n"
        "t = torch.tensor([1])\ntorch_dist.all_reduce(t)\naccelerator.reduce(torch.tensor(1.0), 'mean')\n"
        "gather_object([1])\nx = t.gather(0, t)\naccelerator.backward(t)\n"
    )
    assert [line.split(":")[0] for line in offending_calls(source)] == ["5", "6", "7"]
