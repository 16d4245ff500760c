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
    scripts = Path(__file__).resolve().parents[2] / "launch" / "slurm"
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
    scripts = Path(__file__).resolve().parents[2] / "launch" / "slurm"
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
    # The trainer's words as every run command takes them: --run-dir is run_dir, --config FILE stays.
    shown = invoke_cli("slurm", "pretrain", "--run-dir", "r", "--config", "run.yaml", "--lr", "1e-3").stdout
    assert shown.split(".sbatch ")[1].split() == ["--config", "run.yaml", "run_dir=r", "optim.lr=1e-3"]
    refused = invoke_cli("slurm", "finetune", "--trian", "x", check=False)
    assert refused.exit_code == 2 and "FinetuneConfig has no field trian" in refused.stderr


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
    assert failed.exit_code == 2 and "unknown option --trian" in failed.stderr
    assert "FinetuneConfig has no field trian" in failed.stderr and "train" in failed.stderr


def test_flags_reach_sections_by_their_last_name_and_say_when_that_is_ambiguous() -> None:
    """One mapping everywhere: `--run-dir` is run_dir, `--workers` the one field of that name (data.workers
    in a pretraining config), `--optim.lr` a section's field by its path, `--no-x` a no."""
    from ssit_dist.cli import flags_as_overrides
    from ssit_dist.config import PretrainConfig
    from ssit_dist.data.packing.options import ShardOptions

    words = ["--run-dir", "r", "--workers=3", "--optim.lr", "5e-4", "--loss.ss-cosine-decay", "seed=4"]
    assert flags_as_overrides(words, PretrainConfig) == [
        "run_dir=r",
        "data.workers=3",
        "optim.lr=5e-4",
        "loss.saliency_cosine_decay=true",  # an older name of a section field
        "seed=4",
    ]
    assert flags_as_overrides(["--no-jpeg-roundtrip", "--strict"], ShardOptions) == [
        "jpeg_roundtrip=false",
        "strict=true",
    ]
    with pytest.raises(ValueError, match="--shards is ambiguous in PretrainConfig: write one of --data.shards"):
        flags_as_overrides(["--shards", "x"], PretrainConfig)
    with pytest.raises(ValueError, match="--no-seed: seed is not a yes/no field"):
        flags_as_overrides(["--no-seed"], PretrainConfig)


def test_pretrain_takes_run_dir_and_field_flags_as_finetune_does(shards: Path, tmp_path: Path) -> None:
    """`--run-dir` (and every field flag) is a pretraining field too; the words reach the config before any
    rank starts: here global_batch 7 over 2 ranks is refused by name, so --run-dir was read, not refused."""
    from typer.main import get_command

    from ssit_dist.cli import app
    from ssit_dist.cli.settings import split_words
    from ssit_dist.config import PretrainConfig

    command = get_command(app).commands["pretrain"]  # type: ignore[attr-defined]
    declared = {o: p for p in command.params for o in p.opts if o.startswith("-")}
    words = ["--run-dir", str(tmp_path / "run"), "--nproc", "2", "--global-batch", "7"]
    own, overrides = split_words(words, PretrainConfig, {}, declared, {})
    assert own == ["--nproc", "2"] and overrides == [f"run_dir={tmp_path / 'run'}", "global_batch=7"]
    args = ["pretrain", "--run-dir", tmp_path / "run", "--nproc", 2, f"data.shards=[{shards}]", "--global-batch", 7]
    failed = invoke_cli(*args, check=False)
    assert failed.exit_code == 2 and "global_batch 7" in failed.stderr and "--run-dir" not in failed.stderr
    assert not (tmp_path / "run").exists()  # refused before any rank started


# Each run command, the words it needs besides the one under test, a field=value it refuses and what it says.
RUN_COMMANDS = {
    "pretrain": ([], "optim.lr=0", "PretrainConfig: optim.lr = 0"),
    "finetune": ([], "epochs=0", "FinetuneConfig: epochs = 0"),
    "segment": ([], "iterations=0", "SegmentConfig: iterations = 0"),
    "knn": (["--train", "a", "--test", "b", "--init", "random"], "temperature=0", "KnnConfig: temperature = 0"),
    "shard": (["in", "out"], "size=30", "ShardOptions: size = 30: use a multiple of 16"),
    "data-plan": (["--world", "2"], "global_batch=1", "PretrainConfig: global_batch = 1"),
    "attention": (["photo.jpg"], "img_size=0", "EncoderSource: img_size = 0"),
}


@pytest.mark.parametrize("name", RUN_COMMANDS)
def test_every_run_command_takes_field_values_and_names_a_bad_key_with_its_class(name: str, tmp_path: Path) -> None:
    """`key=value` is read by every run command (a refused value stops it, named), and a key that is no
    field names itself and the config class, as `key=value` and as `--key value`."""
    words, refused, said = RUN_COMMANDS[name]
    words = [str(tmp_path / w) if name == "shard" else w for w in words]
    failed = invoke_cli(name, *words, refused, check=False)
    assert failed.exit_code in (1, 2) and said in failed.stderr, failed.stderr
    kind = said.split(":")[0]
    unknown = invoke_cli(name, *words, "nonsense=1", check=False)
    assert unknown.exit_code in (1, 2) and f"{kind}: unknown field nonsense" in unknown.stderr, unknown.stderr
    flag = invoke_cli(name, *words, "--nonsense", 1, check=False)
    assert flag.exit_code == 2 and f"unknown option --nonsense: {kind} has no field nonsense" in flag.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_file_then_words_set_the_fields_later_words_winning(shards: Path, tmp_path: Path) -> None:
    """`--config FILE` then key=value and flags, on data-plan (the stream's plan, without training): the
    file's fields hold where the words say nothing; data-plan reads the config's own defaults."""
    import dataclasses

    from ssit_dist.config import PretrainConfig

    run = tmp_path / "run.yaml"
    run.write_text(f"data:\n  shards: [{shards}]\n  workers: 3\nglobal_batch: 8\n")
    plan = json.loads(invoke_cli("data-plan", "--world", 2, "--config", run, "data.workers=1").stdout)
    assert plan["streams"] == 2 * 1 and plan["samples_per_epoch"] == 24 // 8 * 8 and len(plan["epochs"]) == 1
    plan = json.loads(invoke_cli("data-plan", shards, "--world", 2, "--global-batch", 4, "--epochs", 2).stdout)
    assert plan["streams"] == 2 * PretrainConfig().data.workers and len(plan["epochs"]) == 2
    assert dataclasses.asdict(PretrainConfig())["data"]["piece_size"] == plan["piece_size"]


def test_knn_options_are_the_config_fields_and_bad_values_name_them(tmp_path: Path) -> None:
    """`ssit-dist knn` takes KnnConfig's fields (its `--k 5,10` spelling kept for ks), lists each with its
    default in --help, and a bad value stops it before any shard is read, naming the option."""
    import dataclasses

    from ssit_dist.cli import flags_as_overrides
    from ssit_dist.eval.knn import KnnConfig

    assert flags_as_overrides(["--k", "5,10"], KnnConfig, {"k": "ks"}) == ["ks=[5,10]"]
    shown = invoke_cli("knn", "--help").stdout
    for field in dataclasses.fields(KnnConfig):
        assert f"--{'k' if field.name == 'ks' else field.name.replace('_', '-')} " in shown, field.name
    assert "default [5, 10, 20]" in shown and "default 0.07" in shown
    for args, message in (
        (["--k", "5,x"], "KnnConfig: --k [5, 'x']"),
        (["--k", "0,5"], "KnnConfig: --k [0, 5]: expected one or more neighbour counts"),
        (["--temperature", "0"], "KnnConfig: --temperature 0.0: must be positive"),
        (["--timm-kwargs", "{bad"], "KnnConfig: --timm-kwargs"),
    ):
        failed = invoke_cli("knn", "--train", tmp_path, "--test", tmp_path, "--init", "random", *args, check=False)
        assert failed.exit_code == 2 and message in failed.stderr, failed.stderr
