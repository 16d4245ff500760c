"""Fine-tuning and evaluation with Accelerate: real labelled shards, a real pretraining export, 1 and 2
CPU processes (gloo), scikit-learn as the judge of the reported numbers."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, cohen_kappa_score

from conftest import SHARED, invoke_cli, pack_real_subset, run_cli
from ssit_dist.config import FinetuneConfig
from ssit_dist.data.loading.grading_transforms import eval_transform
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource
from ssit_dist.dist import free_port
from ssit_dist.eval.over_split import evaluate
from ssit_dist.models.grader import load_grader
from ssit_dist.models.pretrained import EncoderInitError, load_encoder
from ssit_dist.models.ssit import SSiT

ROOT = Path(__file__).resolve().parents[2]
TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
pytestmark = pytest.mark.multiprocess

FIXTURE = SHARED / "fixtures" / "ssit_reference_tiny.pt"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def graded_shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 300 graded photographs at 64 px, split 210 / 45 / 45 (odd evaluation splits)."""
    out = tmp_path_factory.mktemp("graded") / "graded64"
    run_cli(
        "shard",
        graded_dir,
        out,
        "--size",
        64,
        "--shard-size",
        64,
        "--labels",
        graded_dir / "labels.csv",
        "--split",
        "train=0.7,val=0.15,test=0.15",
    )
    return out


@pytest.fixture(scope="module")
def export(graded_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `ssit-dist export` of a short pretraining run (one process, 6 steps) of a tiny ViT."""
    tmp = tmp_path_factory.mktemp("pretrain")
    ds = tmp / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 0},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            }
        )
    )
    cfg = tmp / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp / "run"),
                "ds_config": str(ds),
                "global_batch": 8,
                "epochs": 1,
                "steps_per_epoch": 6,
                "checkpoint_every": 6,
                "model": {"img_size": 32, "proj_hidden": 64, "proj_dim": 32, "timm_kwargs": TINY},
                "data": {"shards": [str(graded_shards)], "workers": 0, "shuffle_buffer": 16},
                "optim": {"lr": 0.01, "warmup_epochs": 0.1},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(MASTER_PORT=str(free_port())),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    invoke_cli("export", tmp / "run", "-o", tmp / "encoder")
    return tmp / "encoder.safetensors"


def finetune(out: Path, shards: Path, init: Path | str, *extra: object, nproc: int = 1) -> tuple[dict, str]:
    """The run's report.json and what it printed."""
    result = run_cli(
        "finetune",
        "--train",
        shards,
        "--val",
        shards,
        "--test",
        shards,
        "--init",
        init,
        "--out",
        out,
        "--nproc",
        nproc,
        "img_size=48",
        "epochs=4",
        "workers=0",
        "lr=0.001",
        *extra,
        timeout=600,
    )
    return json.loads((out / "report.json").read_text()), result.stdout + result.stderr


def test_finetuning_writes_every_output_and_the_numbers_hold(graded_shards: Path, export: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    report, console = finetune(out, graded_shards, export, "grad_accumulation=2")  # micro batches of 8
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "best.safetensors",
        "final.safetensors",
        "report.json",
        "predictions.csv",
        "confusion.png",
        "curves.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert report["init"]["kind"] == "export" and report["test"]["samples"] == 45
    # The console rounds for the eye, metrics.jsonl keeps full precision (45 samples: accuracies of k/45).
    lines = [line for line in console.splitlines() if re.search(r"ssit_dist.finetune: epoch \d+:", line)]
    assert len(lines) == 4 and not re.search(r"\d\.\d{5}", "\n".join(lines)), lines
    assert any(re.search(r"\d\.\d{5}", str(e["train_loss"])) for e in epochs), epochs

    # QWK and accuracy recomputed from predictions.csv by scikit-learn equal the report's.
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 45 and len({r["key"] for r in rows}) == 45
    truth, predicted = [int(r["grade"]) for r in rows], [int(r["prediction"]) for r in rows]
    assert report["test"]["qwk"] == pytest.approx(
        cohen_kappa_score(truth, predicted, weights="quadratic", labels=list(range(5))), abs=1e-9
    )
    assert report["test"]["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    # Each endpoint with its patient-bootstrap interval (one patient per photograph: packed without groups).
    intervals = report["test"]["intervals"]
    assert intervals["patients"] == 45 and intervals["accuracy"]["value"] == pytest.approx(
        report["test"]["accuracy"], abs=1e-4
    )
    for name in ("qwk", "accuracy", "referable_auc", "sensitivity", "specificity"):
        low, high = intervals[name]["ci95"]
        assert intervals[name]["value"] is None or low <= intervals[name]["value"] <= high, name

    # Reloading the best weights reproduces the validation QWK reported for them.
    grader, meta = load_grader(out / "best.safetensors")
    val = LabelledShards(SplitSource(graded_shards, "val"), eval_transform(48, meta["mean"], meta["std"]))
    from accelerate import Accelerator

    again = evaluate(grader, val, Accelerator(cpu=True), FinetuneConfig().eval_batch)["metrics"]
    assert again["qwk"] == pytest.approx(report["val"]["qwk"], abs=1e-9)
    assert again["qwk"] == pytest.approx(meta["val"]["qwk"], abs=1e-9)
    best_row = epochs[report["best_epoch"] - 1]
    assert best_row["val_qwk"] == pytest.approx(meta["val"]["qwk"], abs=1e-9)


EVALUATE = """
import json, sys, torch
from accelerate import Accelerator
from ssit_dist.data.loading.grading_transforms import eval_transform
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource
from ssit_dist.models.grader import Grader
from ssit_dist.models.vit import create_encoder
from ssit_dist.eval.over_split import evaluate
torch.manual_seed(0)
grader = Grader(create_encoder("vit_small_patch16_224", 32, **TINY_KWARGS), "classification")
accelerator = Accelerator(cpu=True)
data = LabelledShards(SplitSource.parse(sys.argv[1], "test"), eval_transform(32, [0.4] * 3, [0.3] * 3))
result = evaluate(grader, data, accelerator, 4)
if accelerator.is_main_process:
    json.dump({"metrics": result["metrics"], "processes": accelerator.num_processes,
               "indices": result["indices"].tolist(), "scores": result["scores"].tolist()}, open(sys.argv[2], "w"))
accelerator.end_training()  # tear the process group down before the interpreter exits, as finetune does
""".replace("TINY_KWARGS", repr(TINY))


def test_two_processes_evaluate_every_sample_exactly_once(graded_shards: Path, tmp_path: Path) -> None:
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    result = subprocess.run(
        [sys.executable, str(script), str(graded_shards), str(one)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(script),
            str(graded_shards),
            str(two),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["indices"] == b["indices"] == list(range(45))  # 45 samples over 2 processes: none twice
    assert a["metrics"] == b["metrics"] and a["metrics"]["samples"] == 45
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)


def test_linear_probe_and_knn_report_qwk_and_accuracy(graded_shards: Path, export: Path, tmp_path: Path) -> None:
    # Two processes through `accelerate launch` (gloo on CPU), bf16 autocast through Accelerate.
    report, _ = finetune(
        tmp_path / "linear", graded_shards, export, "--linear", "epochs=2", "lr=0.01", "mixed_precision=bf16", nproc=2
    )
    assert (
        report["linear"]
        and report["processes"] == 2
        and report["mixed_precision"] == "bf16"
        and {"qwk", "accuracy"} <= set(report["test"])
    )
    assert report["test"]["samples"] == 45
    best, source = load_file(str(tmp_path / "linear" / "best.safetensors")), load_file(str(export))
    for key, value in source.items():  # the encoder stayed frozen (pos_embed: resampled from 32 to 48 px)
        if key != "pos_embed":
            torch.testing.assert_close(best[f"encoder.{key}"], value, rtol=0, atol=0, msg=key)

    out = tmp_path / "knn.json"
    run_cli("knn", "--train", graded_shards, "--test", graded_shards, "--init", export, "--img-size", 48, "-o", out)
    result = json.loads(out.read_text())
    assert set(result["k"]) == {"5", "10", "20"}
    for metrics in result["k"].values():
        assert metrics["samples"] == 45 and -1 <= metrics["qwk"] <= 1 and 0 <= metrics["accuracy"] <= 1
    retrieval = result["view_retrieval"]  # two views of each of the 45 test photographs
    assert retrieval["samples"] == 45 and retrieval["chance"] == 1 / 45 and 0 <= retrieval["top1"] <= 1


def test_reference_checkpoints_and_exports_give_the_source_features(export: Path, tmp_path: Path) -> None:
    if not FIXTURE.is_file():
        pytest.skip(f"reference test vectors not found at {FIXTURE} (../shared is absent here)")
    ref = torch.load(FIXTURE, weights_only=True)
    c = ref["config"]
    kwargs = {
        "patch_size": c["patch_size"],
        "embed_dim": c["embed_dim"],
        "depth": c["depth"],
        "num_heads": c["num_heads"],
    }
    source = SSiT.from_reference(
        ref["state_dict"], img_size=c["img_size"], proj_hidden=c["mlp_dim"], proj_dim=c["dim"], **kwargs
    ).online.encoder.eval()
    checkpoint = tmp_path / "checkpoint.pt"  # the reference's layout: DDP-prefixed keys inside a dict
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref["state_dict"].items()}}, checkpoint)
    encoder, origin = load_encoder(str(checkpoint), c["img_size"], "vit_small_patch16_224", kwargs)
    x = torch.randn(3, 3, c["img_size"], c["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval().forward_features(x), source.forward_features(x))
    assert origin.kind == "reference"

    # epoch_N.pt is a pickled module: refused unless trusted, then the same features.
    pickled = tmp_path / "epoch_3.pt"
    torch.save(source, pickled)
    with pytest.raises(EncoderInitError, match="--trust-pickle"):
        load_encoder(str(pickled), c["img_size"], "vit_small_patch16_224", kwargs)
    trusted, _ = load_encoder(str(pickled), c["img_size"], "vit_small_patch16_224", kwargs, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(trusted.eval().forward_features(x), source.forward_features(x))

    # An export loads with its own arch; at its training size the features equal plain timm's.
    import timm

    meta = json.loads(export.with_suffix(".json").read_text())
    plain = timm.create_model(meta["arch"], num_classes=0, img_size=meta["img_size"], **meta["timm_kwargs"])
    plain.load_state_dict(load_file(str(export)))
    mine, _ = load_encoder(str(export), meta["img_size"])
    x = torch.randn(2, 3, meta["img_size"], meta["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(mine.eval().forward_features(x), plain.eval().forward_features(x))
    # At another size the positional embeddings are resampled (the patch tokens keep their weights).
    bigger, _ = load_encoder(str(export), 64)
    assert bigger.pos_embed.shape[1] == 1 + (64 // 8) ** 2
    torch.testing.assert_close(bigger.patch_embed.proj.weight, plain.patch_embed.proj.weight)


def test_bad_inputs_fail_before_training_naming_what_is_wrong(
    graded_dir: Path, graded_shards: Path, export: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    def fails(*args: object) -> str:
        # In this process (the command with --nproc 1 trains in its own process, it launches nothing):
        # every refusal comes before Accelerate would start a process group or anything trains.
        result = invoke_cli(
            "finetune", "--out", tmp_path / "bad", *args, "img_size=32", "epochs=1", "workers=0", check=False
        )
        assert result.exit_code == 2, result.output + str(result.exception)
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # nothing trained
        return " ".join(result.stderr.split())

    unlabelled = pack_real_subset(graded_dir, tmp_path_factory, 6, size=32, shard_size=6)
    assert "carry no grades" in fails("--train", unlabelled, "--val", graded_shards, "--init", "random")
    message = fails("--train", graded_shards, "--val", graded_shards, "--init", "random", "num_classes=3")
    assert "grade 3" in message and "0..2" in message
    assert "no split 'holdout'" in fails(
        "--train", graded_shards, "--val", f"{graded_shards}:holdout", "--init", "random"
    )
    message = fails("--train", graded_shards, "--val", graded_shards, "--init", export, "arch=vit_base_patch16_224")
    assert "vit_small_patch16_224" in message and "vit_base_patch16_224" in message
    other = tmp_path / "other.pth"  # timm weights of another width
    torch.save(load_encoder("random", 32, "vit_small_patch16_224", {**TINY, "embed_dim": 96})[0].state_dict(), other)
    message = fails(
        "--train", graded_shards, "--val", graded_shards, "--init", other, f"timm_kwargs={json.dumps(TINY)}"
    )
    assert "(1, 1, 96)" in message and "(1, 1, 48)" in message

    # Damaged labelled shards: a truncated copy, a grade that is not a number.
    damaged = tmp_path / "damaged"
    shutil.copytree(graded_shards, damaged)
    first = sorted(damaged.glob("train-*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    message = fails("--train", damaged, "--init", "random")
    assert f"{first} has {first.stat().st_size} bytes" in message and "copy the shard again" in message
    info = json.loads((damaged / "_info.json").read_text())
    info["splits"]["train"]["sizes"] = None  # an index of ssit-dist 0.1.0: the tar itself shows the cut
    (damaged / "_info.json").write_text(json.dumps(info))
    message = fails("--train", damaged, "--init", "random")
    assert f"{first} is truncated inside sample" in message and "copy the shard again" in message
    shutil.copy(graded_shards / first.name, first)
    second = sorted(damaged.glob("train-*.tar"))[1]
    with tarfile.open(second) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    key = next(m.name for m, _ in members if m.name.endswith(".cls")).partition(".")[0]
    with tarfile.open(second, "w") as tar:
        for member, data in members:
            data = b"two" if member.name == f"{key}.cls" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    message = fails("--train", damaged, "--init", "random")
    assert f"{second}: sample {key} has grade 'two'" in message


def test_a_killed_finetune_resumes_to_the_same_weights(graded_shards: Path, tmp_path: Path) -> None:
    def command(out: Path) -> list[str]:
        return [
            str(Path(sys.executable).with_name("ssit-dist")),
            "finetune",
            "--train",
            str(graded_shards),
            "--init",
            "random",
            "--out",
            str(out),
            "img_size=32",
            "epochs=4",
            "workers=0",
            "lr=0.001",
            "arch=vit_small_patch16_224",
            f"timm_kwargs={json.dumps(TINY)}",
        ]

    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=300, env=clean_env())
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(), start_new_session=True
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "epoch0002"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "report.json").exists()

    again = subprocess.run(command(killed), capture_output=True, text=True, timeout=300, env=clean_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after epoch" in again.stderr
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("whole", "killed")
    }
    assert [r["epoch"] for r in rows["killed"]] == [1, 2, 3, 4]
    for a, b in zip(rows["whole"], rows["killed"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    a, b = (load_file(str(tmp_path / name / "final.safetensors")) for name in ("whole", "killed"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_loader_workers_end_with_a_killed_finetune(graded_shards: Path, tmp_path: Path) -> None:
    # The OOM killer takes the trainer alone; its loader workers and their forkserver must not live on.
    import psutil

    command = [
        str(Path(sys.executable).with_name("ssit-dist")),
        "finetune",
        "--train",
        str(graded_shards),
        "--init",
        "random",
        "--out",
        str(tmp_path / "run"),
        "img_size=32",
        "epochs=50",
        "workers=2",
        "lr=0.001",
        "arch=vit_small_patch16_224",
        f"timm_kwargs={json.dumps(TINY)}",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(), start_new_session=True
    )
    try:
        trainer, deadline = psutil.Process(proc.pid), time.monotonic() + 240
        while len(helpers := trainer.children(recursive=True)) < 3:  # the forkserver and two workers, at least
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its workers started"
            time.sleep(0.1)
        proc.kill()  # the trainer only
        proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while alive := [p.pid for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() < deadline, f"loader processes {alive} outlived the killed trainer"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_checkpoint_a_process_cannot_read_is_named(graded_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = (
        "--train",
        graded_shards,
        "--init",
        "random",
        "--run-dir",
        run_dir,
        "img_size=32",
        "epochs=1",
        "workers=0",
        "arch=vit_small_patch16_224",
        f"timm_kwargs={json.dumps(TINY)}",
    )
    run_cli("finetune", *args)
    missing = run_dir / "checkpoints" / "epoch0001" / "optimizer.pt"
    missing.unlink()
    result = run_cli("finetune", *args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert "cannot be read on every rank" in message and "rank 0 on" in message and f"{missing} is missing" in message


def test_loader_workers_of_different_ranks_draw_different_augmentations(graded_shards: Path) -> None:
    # Fine-tuning's loader, as set_up builds it: one shuffling generator seeded alike on every rank (the
    # distributed sampler must permute alike), the real training transform, worker_options with the rank.
    from torch.utils.data import DataLoader

    from ssit_dist.data.loading.grading_transforms import train_transform
    from ssit_dist.data.loading.labelled import collate_labelled
    from ssit_dist.data.loading.workers import worker_options

    def first_batch(rank: int) -> torch.Tensor:
        source = SplitSource(graded_shards, "train")
        index = json.loads((graded_shards / "_info.json").read_text())
        data = LabelledShards(source, train_transform(32, index["mean"], index["std"]))
        order = torch.Generator().manual_seed(7)
        loader = DataLoader(
            data, batch_size=4, generator=order, collate_fn=collate_labelled, **worker_options(1, rank=rank)
        )
        images = next(iter(loader))[0]
        return images

    rank0, rank1 = first_batch(0), first_batch(1)
    assert not torch.equal(rank0, rank1)  # the same samples (no sampler here), other crops and flips
    assert torch.equal(first_batch(1), rank1)  # and still a function of (seed, rank)


def test_a_timm_folder_export_loads_in_plain_timm_and_as_init(
    graded_shards: Path, export: Path, tmp_path: Path
) -> None:
    """`--format timm`: a folder that `timm.create_model("local-dir:...", pretrained=True)` loads in a
    process that never imports ssit_dist, from another working directory, with the export's features,
    input size and normalisation; a model card written from the run; the folder is an `init` too."""
    run = export.parent / "run"
    folder = tmp_path / "encoder_timm"
    invoke_cli("export", run, "-o", folder, "--format", "timm")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    meta = json.loads(export.with_suffix(".json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import sys, timm, torch\n"
        "m = timm.create_model(f'local-dir:{sys.argv[1]}', pretrained=True).eval()\n"
        "assert 'ssit_dist' not in sys.modules\n"
        "c = timm.data.resolve_data_config(model=m)\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save({'features': m.forward_features(x), 'size': list(c['input_size']), 'mean': list(c['mean']),"
        " 'std': list(c['std']), 'classes': m.num_classes}, sys.argv[3])\n"
    )
    x = torch.randn(2, 3, meta["img_size"], meta["img_size"])
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe, folder, tmp_path / "x.pt", tmp_path / "out.pt"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = torch.load(tmp_path / "out.pt", weights_only=True)
    mine, _ = load_encoder(str(export), meta["img_size"])
    from_folder, origin = load_encoder(str(folder), meta["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(seen["features"], mine.eval().forward_features(x))
        torch.testing.assert_close(from_folder.eval().forward_features(x), mine.forward_features(x))
    assert seen["size"] == [3, meta["img_size"], meta["img_size"]] and seen["classes"] == 0
    assert seen["mean"] == pytest.approx(meta["mean"]) and seen["std"] == pytest.approx(meta["std"])
    assert origin.kind == "export" and origin.arch == meta["arch"] and origin.timm_kwargs == TINY

    card = (folder / "README.md").read_text()
    shard_hashes = [s["sha256"] for s in meta["fingerprint"]["shards"]]
    assert "global batch 8 over 1 ranks" in card and "1 epochs x 6 steps" in card and "huang2024ssit" in card
    assert shard_hashes and all(h in card for h in shard_hashes)
    assert '"contrastive_loss"' in card  # the final losses, from metrics.jsonl

    out = tmp_path / "knn.json"  # the folder as `init` of a command
    run_cli("knn", "--train", graded_shards, "--test", graded_shards, "--init", folder, "--img-size", 32, "-o", out)
    assert json.loads(out.read_text())["encoder"] == "export"


def test_the_momentum_encoder_exports_beside_the_query_encoder(export: Path, tmp_path: Path) -> None:
    run = export.parent / "run"
    invoke_cli("export", run, "-o", tmp_path / "momentum", "--encoder", "momentum")
    momentum, query = load_file(str(tmp_path / "momentum.safetensors")), load_file(str(export))
    (tag,) = [p for p in (run / "checkpoints").iterdir() if p.is_dir()]
    kept = torch.load(tag / "momentum.pt", weights_only=True)
    assert set(momentum) == set(query)
    for key, value in momentum.items():
        torch.testing.assert_close(value, kept[f"encoder.{key}"].float(), rtol=0, atol=0)
    assert any(not torch.equal(momentum[k], query[k]) for k in query)  # the EMA lags the trained weights
    assert json.loads((tmp_path / "momentum.json").read_text())["encoder"] == "momentum"
    refused = invoke_cli("export", run, "-o", tmp_path / "x", "--encoder", "key", check=False)
    assert refused.exit_code == 1 and "--encoder 'key': expected query or momentum" in refused.output
