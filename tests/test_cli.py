"""The `ssit-dist` commands that only report or print (`info`, `config`, `slurm`), run in this process by
typer's test runner: the same app, arguments, output and exit codes as the installed command."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import cv2
import pytest
import torch

from conftest import invoke_cli


@pytest.mark.multiprocess  # DeepSpeed's op checks run the compiler
def test_info_json_reports_versions_and_accelerator() -> None:
    report = json.loads(invoke_cli("info", "--json").stdout)
    assert report["packages"]["torch"] == importlib.metadata.version("torch")
    assert report["packages"]["deepspeed"] == importlib.metadata.version("deepspeed")
    assert report["opencv"] == {"version": cv2.__version__, "saliency": True}
    assert len(report["cuda"]) == torch.cuda.device_count()
    expected = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
    assert (report["deepspeed"]["accelerator"], report["deepspeed"]["communication_backend"]) == expected
    assert {"cpu_adam", "fused_adam"} <= set(report["deepspeed"]["ops"])
    flags = Path("/proc/cpuinfo").read_text()
    assert report["cpu"]["bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.multiprocess  # DeepSpeed's op checks run the compiler
def test_info_fits_one_screen() -> None:
    text = invoke_cli("info").stdout
    assert "deepspeed" in text and "cpu_adam" in text
    assert len(text.splitlines()) <= 40


def test_config_lists_every_field_with_type_default_and_help() -> None:
    import dataclasses

    from ssit_dist.config import FinetuneConfig

    shown = invoke_cli("config", "pretrain").stdout
    for field, kind in (("optim.lr", "float"), ("micro_batch", "int or null"), ("data.shards", "list of str")):
        line = next(x for x in shown.splitlines() if x.split() and x.split()[0] == field)
        assert kind in line
    assert "peak learning rate" in shown  # the field's help
    # A section's own defaults: the second view keeps the reference's blur probability 0.1, not view 1's.
    blur = {x.split()[0]: x.split()[2] for x in shown.splitlines() if x.split() and "blur_p" in x.split()[0]}
    assert blur == {"augment.view1.blur_p": "1.0", "augment.view2.blur_p": "0.1"}
    finetune = invoke_cli("config", "finetune").stdout
    assert all(f.name in finetune for f in dataclasses.fields(FinetuneConfig))
    assert invoke_cli("config", "nonsense", check=False).exit_code == 2


def test_slurm_prints_the_exact_sbatch_command() -> None:
    script = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "pretrain.sbatch"
    shown = invoke_cli(
        "slurm",
        "pretrain",
        "--nodes",
        4,
        "--gpus-per-node",
        8,
        "--cpus-per-rank",
        16,
        "--mem-per-cpu",
        "8G",
        "--partition",
        "gpu",
        "--time",
        "24:00:00",
        "--config",
        "run.yaml",
        "optim.lr=5e-4",
    ).stdout.strip()
    assert shown == (
        "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=16 --mem-per-cpu=8G "
        f"--partition=gpu --time=24:00:00 {script} "
        "--config run.yaml optim.lr=5e-4"
    )
    cpu = invoke_cli("slurm", "finetune", "--ranks-per-node", 2, "train=shards/graded").stdout.strip()
    assert cpu.startswith("sbatch --nodes=1 --ntasks-per-node=2 ") and cpu.endswith(
        "finetune.sbatch train=shards/graded"
    )
    bad = invoke_cli("slurm", "evaluate", check=False)
    assert bad.exit_code == 2 and "job 'evaluate': choose pretrain or finetune" in bad.stderr
