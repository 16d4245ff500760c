"""The `ssit-dist` commands that only report or print (`info`, `config`, `slurm`), run in this process by
typer's test runner: the same app, arguments, output and exit codes as the installed command."""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import sys
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
    lines = {x.split()[0]: x for x in shown.splitlines() if x.split()}
    shown_kinds = (
        ("optim.lr", "float, positive"),
        ("micro_batch", "int or null, at least 2"),
        ("data.shards", "list of str"),
        ("model.mask_ratio", "float, in [0, 1)"),  # the range the config checks, from the same field
    )
    for field, kind in shown_kinds:
        assert kind in lines[field]
    assert "peak learning rate" in shown  # the field's help
    # A section's own defaults: the second view keeps the reference's blur probability 0.1, not view 1's.
    assert " 1.0 " in lines["augment.view1.blur_p"] and " 0.1 " in lines["augment.view2.blur_p"]
    finetune = invoke_cli("config", "finetune").stdout
    assert all(f.name in finetune for f in dataclasses.fields(FinetuneConfig))
    assert invoke_cli("config", "nonsense", check=False).exit_code == 2


def test_slurm_prints_the_exact_sbatch_command() -> None:
    scripts = Path(__file__).resolve().parents[1] / "launch" / "slurm"
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
        "--max-timeouts",
        0,
        "--partition",
        "gpu",
        "--time",
        "24:00:00",
        "--config",
        "run.yaml",
        "optim.lr=5e-4",
    ).stdout.strip()
    assert shown == (
        f"SSIT_PYTHON={sys.executable} SSIT_MAX_TIMEOUTS=0 "
        "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=16 --mem-per-cpu=8G "
        f"--partition=gpu --time=24:00:00 {scripts / 'pretrain.sbatch'} "
        "--config run.yaml optim.lr=5e-4"
    )
    bad = invoke_cli("slurm", "evaluate", check=False)
    assert bad.exit_code == 2 and "job 'evaluate': choose pretrain or finetune" in bad.stderr


def test_slurm_prints_the_resources_the_scripts_ask_for_by_default() -> None:
    """Cores, memory and the time-limit requeues a job gets unless told otherwise are in the printed line:
    the scripts' own #SBATCH values (which still serve a plain `sbatch` of the script) and 3 requeues."""
    scripts = Path(__file__).resolve().parents[1] / "launch" / "slurm"
    for job, cores, extra in (("pretrain", 15, "SSIT_MAX_TIMEOUTS=3 "), ("finetune", 8, "")):
        assert f"#SBATCH --cpus-per-task={cores}\n#SBATCH --mem-per-cpu=4G\n" in (scripts / f"{job}.sbatch").read_text()
        shown = invoke_cli("slurm", job, "--ranks-per-node", 2, "run_dir=r").stdout.strip()
        assert shown == (
            f"SSIT_PYTHON={sys.executable} {extra}sbatch --nodes=1 --ntasks-per-node=2 "
            f"--cpus-per-task={cores} --mem-per-cpu=4G {scripts / f'{job}.sbatch'} run_dir=r"
        )
    # Parsed back by a shell, the line keeps every word (a path with a space stays one argument).
    words = shlex.split(invoke_cli("slurm", "pretrain", "--config", "my run.yaml").stdout)
    assert words[0] == f"SSIT_PYTHON={sys.executable}" and words[-2:] == ["--config", "my run.yaml"]
    refused = invoke_cli("slurm", "finetune", "--max-timeouts", 2, "train=x", check=False)
    assert refused.exit_code == 2 and "a finetune job is never requeued at its time limit" in refused.stderr


def test_finetune_flags_are_the_config_fields() -> None:
    """`ssit-dist finetune` declares no fields of its own: every flag is a FinetuneConfig field (or its
    older name), so a new field is a flag at once and a default lives in one place."""
    from ssit_dist.cli import flags_as_overrides
    from ssit_dist.config import FinetuneConfig, load_config

    args = ["--train", "a:train", "--out=b", "--linear", "epochs=2", "--eval-batch", "8"]
    overrides = flags_as_overrides(args, FinetuneConfig)
    assert overrides == ["train=a:train", "run_dir=b", "linear=true", "epochs=2", "eval_batch=8"]
    cfg = load_config(None, overrides, kind=FinetuneConfig)
    assert (cfg.train, cfg.run_dir, cfg.linear, cfg.epochs, cfg.eval_batch) == ("a:train", "b", True, 2, 8)
    failed = invoke_cli("finetune", "--trian", "a", check=False)
    assert failed.exit_code == 2 and "unknown option --trian" in failed.stderr and "train" in failed.stderr


def test_knn_options_are_the_config_fields_and_bad_values_name_them(tmp_path: Path) -> None:
    """`ssit-dist knn` takes each option's default and help from KnnConfig (one place), and a bad value
    stops it before any shard is read, naming the option or field."""
    import dataclasses

    from typer.main import get_command

    from ssit_dist.cli import app
    from ssit_dist.eval.knn import KnnConfig

    options = {p.name: p for p in get_command(app).commands["knn"].params}  # type: ignore[attr-defined]
    config = KnnConfig(train="a", test="b", init="random")
    assert options["k"].default == "5,10,20" == ",".join(map(str, config.ks))
    for field in dataclasses.fields(KnnConfig):
        option = options.get(field.name)
        if option is not None:
            assert option.help.lower().startswith(field.metadata["help"].lower()), field.name
            assert option.required or option.default == getattr(config, field.name), field.name
    for args, message in (
        (["--k", "5,x"], "--k 5,x: expected neighbour counts separated by commas"),
        (["--k", "0,5"], "ks = [0, 5]: expected one or more neighbour counts"),
        (["--temperature", "0"], "temperature = 0.0: must be positive"),
        (["--timm-kwargs", "{bad"], "--timm-kwargs {bad: not JSON"),
    ):
        failed = invoke_cli("knn", "--train", tmp_path, "--test", tmp_path, "--init", "random", *args, check=False)
        assert failed.exit_code == 2 and message in failed.stderr, failed.stderr
