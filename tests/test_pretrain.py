"""DeepSpeed pretraining end to end: 2 CPU ranks (gloo), a tiny ViT, real shards of real photographs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from conftest import pack_real_subset, run_cli
from ssit_dist.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def tiny_shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real photographs at 64 px in uneven shards (7, 7, 7, 7, 7, 5)."""
    return pack_real_subset(graded_dir, tmp_path_factory, 40, size=64, shard_size=7)


def ds_config(tmp: Path, stage: int, bf16: bool = False) -> Path:
    path = tmp / f"zero{stage}{'_bf16' if bf16 else ''}.json"
    body = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0, "steps_per_print": 10**6,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
    if bf16:
        body["bf16"] = {"enabled": True}
    path.write_text(json.dumps(body))
    return path


def config(tmp: Path, shards: Path, name: str, ds: Path, **extra: object) -> Path:
    body = {"run_dir": str(tmp / name), "ds_config": str(ds), "global_batch": 8, "micro_batch": 2,
            "epochs": 2, "steps_per_epoch": 4, "checkpoint_every": 2, "keep_checkpoints": 4, "seed": 3,
            "model": {"arch": "vit_small_patch16_224", "img_size": 32, "proj_hidden": 64, "proj_dim": 32,
                      "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}},
            "data": {"shards": [str(shards)], "workers": 1, "shuffle_buffer": 16},
            "optim": {"warmup_epochs": 0.5, "lr": 0.005}}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        (body.setdefault(section, {}) if field else body)[field or section] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def torchrun(cfg: Path, nproc: int = 2) -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            str(ROOT / "launch" / "pretrain.py"), "--config", str(cfg)]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def train(cfg: Path, nproc: int = 2) -> list[dict]:
    result = subprocess.run(torchrun(cfg, nproc), capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = Path(yaml.safe_load(cfg.read_text())["run_dir"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero_stages_agree_in_fp32_and_bf16_is_close(tiny_shards: Path, tmp_path: Path) -> None:
    runs = {stage: train(config(tmp_path, tiny_shards, f"z{stage}", ds_config(tmp_path, stage))) for stage in range(4)}
    # The stages sum gradients in different orders; the fp32 rounding differences (~1e-7) are the
    # only difference, and the contrastive loss amplifies them a little with every step.
    for stage in range(4):
        assert [r["step"] for r in runs[stage]] == list(range(1, 9))
        for a, b in zip(runs[0], runs[stage]):
            tolerance = 1e-5 if a["step"] <= 3 else 5e-3
            assert a["cl_loss"] == pytest.approx(b["cl_loss"], rel=tolerance), (stage, a["step"])
            assert a["ss_loss"] == pytest.approx(b["ss_loss"], rel=tolerance), (stage, a["step"])
    bf16 = train(config(tmp_path, tiny_shards, "bf16", ds_config(tmp_path, 2, bf16=True)))
    assert all(torch.isfinite(torch.tensor([r["cl_loss"], r["ss_loss"]])).all() for r in bf16)
    assert bf16[0]["cl_loss"] == pytest.approx(runs[0][0]["cl_loss"], rel=0.1)  # bf16: 8-bit mantissa
    assert bf16[0]["ss_loss"] == pytest.approx(runs[0][0]["ss_loss"], rel=0.05)
    # Training does something: the weights moved, so the losses changed from step to step.
    assert len({round(r["cl_loss"], 6) for r in runs[0]}) == 8
    assert list((tmp_path / "z0" / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert all({"pairs_per_s", "data_wait_s", "peak_mem_mb", "lr", "momentum"} <= set(r) for r in runs[0])

    # After step 2 (identical losses so far) ZeRO-0's weights, read straight from its module, and
    # ZeRO-3's, reassembled from shards, export to the same encoder, which plain timm loads.
    encoders = []
    for stage in (0, 3):
        out = tmp_path / f"export{stage}" / "encoder"
        run_cli("export", tmp_path / f"z{stage}", "-o", out, "--tag", "step00000002")
        meta = json.loads(out.with_suffix(".json").read_text())
        model = timm.create_model(meta["arch"], pretrained=False, num_classes=0, img_size=meta["img_size"],
                                  **meta["timm_kwargs"])
        model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))), strict=True)
        encoders.append(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = [encoder(x) for encoder in encoders]
        fresh = timm.create_model(meta["arch"], pretrained=False, num_classes=0, img_size=32, **meta["timm_kwargs"])
        untrained = fresh.eval()(x)
    torch.testing.assert_close(features[0], features[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features[0], untrained, atol=1e-3)  # the export holds trained weights


def test_killed_job_resumes_to_the_same_weights(tiny_shards: Path, tmp_path: Path) -> None:
    ds = ds_config(tmp_path, 2)
    # The uninterrupted run names its shards by a brace pattern: the same shards, counts and mean/std
    # as the folder, so the same data.
    pattern = f"{tiny_shards}/train-{{000000..000005}}.tar"
    train(config(tmp_path, tiny_shards, "whole", ds, data__shards=[pattern]))

    cfg = config(tmp_path, tiny_shards, "killed", ds)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    proc = subprocess.Popen(torchrun(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step00000004"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, every rank, without warning
    proc.wait(timeout=60)
    killed_at = json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < 8

    # Resumed through the deepspeed launcher, as `ssit-dist pretrain --nproc 2` starts it.
    run_cli("pretrain", "--config", cfg, "--nproc", 2, timeout=300)
    resumed = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == 8
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["cl_loss"] == pytest.approx(whole[-1]["cl_loss"], rel=1e-6)
    for name in ("whole", "killed"):
        run_cli("export", tmp_path / name, "-o", tmp_path / f"{name}_export" / "encoder")
    a = load_file(str(tmp_path / "whole_export" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "killed_export" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _launch_one(cfg: Path) -> subprocess.CompletedProcess[str]:
    e = env()
    e.update(MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=e)


def test_wrong_configs_fail_fast_naming_the_field(tiny_shards: Path, tmp_path: Path) -> None:
    ds = ds_config(tmp_path, 0)
    result = _launch_one(config(tmp_path, tiny_shards, "odd", ds, global_batch=7))
    assert result.returncode == 2 and "global_batch 7" in result.stderr
    result = _launch_one(config(tmp_path, tiny_shards, "missing", ds, data__shards=[str(tmp_path / "nowhere")]))
    assert result.returncode == 2 and "nowhere" in result.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in tiny_shards.glob("train-*.tar"):
        (bare / tar.name).symlink_to(tar)
    result = _launch_one(config(tmp_path, tiny_shards, "bare", ds, data__shards=[f"{bare}/train-{{000000..000005}}.tar"]))
    assert result.returncode == 2 and "data.mean / data.std" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    result = _launch_one(config(tmp_path, tiny_shards, "bad", bad))
    assert result.returncode == 2 and "fp16 and bf16" in result.stderr
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}))
    result = _launch_one(config(tmp_path, tiny_shards, "bad2", bad))
    assert result.returncode == 2 and "offload_param needs stage 3" in result.stderr
    bad.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    result = _launch_one(config(tmp_path, tiny_shards, "bad3", bad))
    assert result.returncode == 2 and "zero_optimisation" in result.stderr


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tiny_shards: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, tiny_shards, "diverged", ds_config(tmp_path, 0), checkpoint_every=1,
                 optim={"lr": 1e30, "warmup_epochs": 0.0})
    result = subprocess.run(torchrun(cfg), capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode != 0
    run_dir = tmp_path / "diverged"
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad_step = len(logged) + 1  # the step whose loss was not finite is not logged
    assert f"non-finite loss at step {bad_step}" in result.stderr and bad_step <= 8
    assert all(math.isfinite(r["cl_loss"]) and math.isfinite(r["ss_loss"]) for r in logged)
    # The last checkpoint is the last good step's, complete and loadable.
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{len(logged):08d}" and f"last good checkpoint is {latest}" in result.stderr
    run_cli("export", run_dir, "-o", tmp_path / "diverged_export" / "encoder")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_shards: Path, tmp_path: Path) -> None:
    # What SLURM sends before the time limit: the job must save where it is and stop with exit 0.
    cfg = config(tmp_path, tiny_shards, "preempted", ds_config(tmp_path, 0), checkpoint_every=100)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    proc = subprocess.Popen(torchrun(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    import psutil

    # Every process under the launcher (ranks, loader workers, their forkserver), as srun and
    # scancel signal every process of a job step.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    latest = (tmp_path / "preempted" / "checkpoints" / "latest").read_text().strip()
    stopped_at = len(metrics.read_text().splitlines())
    assert latest == f"step{stopped_at:08d}" and stopped_at < 8  # saved exactly where it stopped
    resumed = train(cfg)
    assert [r["step"] for r in resumed] == list(range(1, 9))
