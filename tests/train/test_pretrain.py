"""DeepSpeed pretraining end to end: 2 CPU ranks (gloo), a tiny ViT, real shards of real photographs."""

from __future__ import annotations

import json
import math
import os
import re
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

from conftest import invoke_cli, pack_real_subset, run_cli
from ssit_dist.dist import free_port
from tiny_runs import ROOT, assert_same_encoders, config, ds_config, env, torchrun, train

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def tiny_shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real photographs at 64 px in uneven shards (7, 7, 7, 7, 7, 5)."""
    return pack_real_subset(graded_dir, tmp_path_factory, 40, size=64, shard_size=7)


def _encoder_at(run_dir: Path, tag: str, out: Path) -> dict[str, torch.Tensor]:
    from ssit_dist.train.export import export_encoder

    weights, _ = export_encoder(run_dir, out / f"{run_dir.name}_{tag}")
    return load_file(str(weights))


def test_zero_stages_make_the_same_update_and_bf16_is_close(tiny_shards: Path, tmp_path: Path) -> None:
    # What ZeRO 1-3 change is where gradients and optimizer states live, not the arithmetic: the update
    # of each step must be ZeRO-0's. Compared where that holds on every CPU: the parameters after steps
    # 1, 2 and 3 at a small lr. Adam moves each weight by lr * m/(sqrt(v) + eps); a change dg of a
    # gradient changes that by at most about lr * |dg| / eps. The stages sum and clip gradients in other
    # orders and buckets, so dg is fp32 rounding: for sums of up to ~1e3 terms of gradients clipped to
    # norm 1.0 it is below n * 2^-24 ~ 1e-4 on any CPU. With eps = 1e-3 (the default 1e-8 would amplify
    # the rounding of near-zero gradients a hundred-thousandfold) the updates therefore agree within
    # 0.1 * lr per step, while the update of a weight with a real gradient is close to lr: a lost or
    # doubled gradient, or a stale partition, shows.
    # Losses over many steps are chaotic in the rounding and are not compared here (the kill-and-resume
    # and SIGTERM tests train 8 steps on ZeRO 0 and 2 as the multi-step smoke check).
    steps = {"epochs": 1, "steps_per_epoch": 3, "checkpoint_every": 1, "optim": {"lr": 0.005, "warmup_epochs": 0.0}}
    # ZeRO-3 also measures view retrieval (rank 0 alone, by the momentum encoder) at steps 2 and 3.
    retrieval = {"retrieval": {"shards": str(tiny_shards), "every": 2, "samples": 6}}
    runs = {
        stage: train(
            config(
                tmp_path,
                tiny_shards,
                f"z{stage}",
                ds_config(tmp_path, stage, eps=1e-3),
                **steps,
                **(retrieval if stage == 3 else {}),
            )
        )
        for stage in range(4)
    }
    lr = runs[0][0]["lr"]
    assert lr == pytest.approx(0.005 * 8 / 512)
    from ssit_dist.models.model_config import ModelConfig
    from ssit_dist.models.ssit import SSiT

    torch.manual_seed(3)  # the run's seed: the weights every stage started from
    model_cfg = yaml.safe_load((tmp_path / "z0.yaml").read_text())["model"]
    start = {k: v.detach() for k, v in SSiT(ModelConfig(**model_cfg)).online.encoder.state_dict().items()}
    exported = tmp_path / "exported"
    for step in (1, 2, 3):
        tag = f"step{step:08d}"
        reference = _encoder_at(tmp_path / "z0", tag, exported)
        moved = max((reference[k] - start[k]).abs().max().item() for k in start)
        assert moved > 0.1 * lr, (step, moved, lr)  # the weights moved: it trained
        for stage in (1, 2, 3):
            other = _encoder_at(tmp_path / f"z{stage}", tag, exported)
            assert other.keys() == reference.keys()
            for key in reference:
                torch.testing.assert_close(
                    other[key],
                    reference[key],
                    rtol=0,
                    atol=0.1 * lr * step,
                    msg=f"ZeRO {stage} vs 0 after step {step}: {key}",
                )
    for stage in range(4):
        assert [r["step"] for r in runs[stage]] == [1, 2, 3]
        # The first loss is computed before any update, from the same weights and data; the later ones
        # after updates of ~lr, which move the loss far less than its own scale.
        assert runs[stage][0]["contrastive_loss"] == pytest.approx(runs[0][0]["contrastive_loss"], rel=1e-5)
        for a, b in zip(runs[0], runs[stage], strict=True):
            assert a["contrastive_loss"] == pytest.approx(b["contrastive_loss"], rel=1e-3)
            assert a["saliency_loss"] == pytest.approx(b["saliency_loss"], rel=1e-3)
    bf16 = train(config(tmp_path, tiny_shards, "bf16", ds_config(tmp_path, 2, bf16=True), **steps))
    assert all(torch.isfinite(torch.tensor([r["contrastive_loss"], r["saliency_loss"]])).all() for r in bf16)
    assert bf16[0]["contrastive_loss"] == pytest.approx(runs[0][0]["contrastive_loss"], rel=0.1)  # bf16: 8-bit mantissa
    assert bf16[0]["saliency_loss"] == pytest.approx(runs[0][0]["saliency_loss"], rel=0.05)
    assert list((tmp_path / "z0" / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert all({"pairs_per_s", "data_wait_s", "peak_mem_mb", "lr", "momentum"} <= set(r) for r in runs[0])
    assert ["view_retrieval" in r for r in runs[3]] == [False, True, True]
    assert all(0 <= r["view_retrieval"] <= 1 and (12 * r["view_retrieval"]).is_integer() for r in runs[3][1:])

    # The fp32 momentum network is written once per checkpoint (rank 0), not into every rank's file.
    z3 = tmp_path / "z3" / "checkpoints" / "step00000003"
    momentum_bytes = (z3 / "momentum.pt").stat().st_size
    rank_files = list(z3.glob("zero_pp_rank_*_model_states.pt"))
    assert len(rank_files) == 2 and all(f.stat().st_size < momentum_bytes / 2 for f in rank_files)
    # DeepSpeed leaves its zero_to_fp32.py beside ZeRO 1-3 checkpoints only (README: `ssit-dist export` for all;
    # test_resume_safety.py checks that the tool's weights are the export's).
    tools = [(tmp_path / f"z{stage}" / "checkpoints" / "zero_to_fp32.py").is_file() for stage in range(4)]
    assert tools == [False, True, True, True]

    # ZeRO-3's weights, reassembled from shards by `ssit-dist export`, load into plain timm.
    out = tmp_path / "export3" / "encoder"
    invoke_cli("export", tmp_path / "z3", "-o", out, "--tag", "step00000003")
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(
        meta["arch"], pretrained=False, num_classes=0, img_size=meta["img_size"], **meta["timm_kwargs"]
    )
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))), strict=True)


def test_retrieval_and_checkpoints_by_time_keep_the_ranks_in_step(tiny_shards: Path, tmp_path: Path) -> None:
    # Rank 0 alone measures view retrieval, but every rank must stop at that step's sync point: a rank
    # that did not would meet rank 0's agreement collective with its next step's and the job would die.
    # Checkpoints by time (here due at once) are agreed at each sync point: each rank's clock differs.
    cfg = config(
        tmp_path,
        tiny_shards,
        "retrieval",
        ds_config(tmp_path, 0),
        epochs=1,
        steps_per_epoch=5,
        checkpoint_every=None,
        checkpoint_every_minutes=1e-6,
        log_every=2,
        dist_timeout_s=60,
        retrieval={"shards": str(tiny_shards), "every": 3, "samples": 6},
    )
    records = train(cfg)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert ["view_retrieval" in r for r in records] == [False, False, True, False, True]  # every 3, and the end
    saved = sorted(p.name for p in (tmp_path / "retrieval" / "checkpoints").glob("step*"))
    assert saved == [f"step0000000{s}" for s in (2, 3, 4, 5)]  # each sync point (log_every, retrieval, end)


def test_killed_job_resumes_to_the_same_weights(tiny_shards: Path, tmp_path: Path) -> None:
    ds = ds_config(tmp_path, 2)
    # The uninterrupted run names its shards by a brace pattern: the same shards, counts and mean/std
    # as the folder, so the same data.
    pattern = f"{tiny_shards}/train-{{000000..000005}}.tar"
    train(config(tmp_path, tiny_shards, "whole", ds, data__shards=[pattern], data__workers=1))

    cfg = config(tmp_path, tiny_shards, "killed", ds, data__workers=1)  # a loader worker's place is resumed too
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    proc = subprocess.Popen(
        torchrun(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step00000004"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, every rank, without warning
    proc.wait(timeout=60)
    killed_at = json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < 8

    # Resumed as `ssit-dist pretrain --nproc 2` starts it (ssit_dist/local_launch.py).
    result = run_cli("pretrain", "--config", cfg, "--nproc", 2, timeout=300)
    # DeepSpeed's CPU collectives (the launcher's runs) map a /dev/shm buffer per rank; their names are
    # gone once the ranks have started, so no run leaves them behind (dist.release_shared_memory_names).
    port = re.search(r"rendezvous 127\.0\.0\.1:(\d+)", result.stderr)
    assert port, "the launcher's command line names no port"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port[1]}_*"))
    resumed = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == 8
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["contrastive_loss"] == pytest.approx(whole[-1]["contrastive_loss"], rel=1e-6)
    assert_same_encoders(tmp_path, "whole", "killed")


def _launch_one(cfg: Path) -> subprocess.CompletedProcess[str]:
    e = env()
    e.update(MASTER_PORT=str(free_port()))
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env=e,
    )


def test_one_process_trains_in_bf16_on_cpu(tiny_shards: Path, tmp_path: Path) -> None:
    # `python launch/pretrain.py` on a workstation with a bf16 DeepSpeed config (the default one): the
    # engine gives the projector's BatchNorm bf16 weights beside fp32 running statistics.
    cfg = config(tmp_path, tiny_shards, "one_bf16", ds_config(tmp_path, 2, bf16=True), epochs=1)
    result = _launch_one(cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "one_bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["contrastive_loss"]) and math.isfinite(r["saliency_loss"]) for r in rows)
    flags = Path("/proc/cpuinfo").read_text()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert ("bfloat16 is emulated on this CPU" in result.stderr) == (not native)  # and says what to use instead


# The real trainer with a fault injected into the online network's forward at its third call, when the
# loader's workers are running.
FAILING_STEP = """
import sys
from ssit_dist.models.ssit import OnlineNetwork
from ssit_dist.train.pretrain import main
forward, calls = OnlineNetwork.forward, []
def failing(self, *inputs):
    calls.append(None)
    if len(calls) == 3:
        raise RuntimeError("injected failure in the training step")
    return forward(self, *inputs)
OnlineNetwork.forward = failing
sys.exit(main(sys.argv[1:]))
"""


def test_an_error_in_the_training_step_ends_the_process(tiny_shards: Path, tmp_path: Path) -> None:
    # A bug or an out-of-memory error in the step must end the job with its traceback, not leave the
    # process waiting for its loader workers (which ignore SIGTERM) until the SLURM time limit.
    cfg = config(tmp_path, tiny_shards, "crash", ds_config(tmp_path, 0), data__workers=2)
    e = env()
    e.update(MASTER_PORT=str(free_port()))
    result = subprocess.run(
        [sys.executable, "-c", FAILING_STEP, "--config", str(cfg)], capture_output=True, text=True, timeout=150, env=e
    )
    assert result.returncode == 1 and "RuntimeError: injected failure in the training step" in result.stderr


def test_a_wrong_config_ends_the_trainer_with_exit_code_2_naming_the_field(tiny_shards: Path, tmp_path: Path) -> None:
    # Each wrong field is checked in one process by test_pretrain_inputs.py, through the function the trainer
    # runs first (check_inputs); this pins that the trainer runs it and what a launcher sees.
    result = _launch_one(config(tmp_path, tiny_shards, "odd", ds_config(tmp_path, 0), global_batch=7))
    assert result.returncode == 2 and "global_batch 7" in result.stderr
    assert not (tmp_path / "odd" / "metrics.jsonl").exists()
    # `ssit-dist pretrain` checks the same before it starts any rank: the error once, no rendezvous.
    cfg = config(tmp_path, tiny_shards, "cli", ds_config(tmp_path, 0))
    result = run_cli("pretrain", "--config", cfg, "--nproc", 2, "optim.lrr=1", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("unknown field optim.lrr") == 1 and "rendezvous" not in result.stderr, result.stderr


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tiny_shards: Path, tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        tiny_shards,
        "diverged",
        ds_config(tmp_path, 0),
        checkpoint_every=1,
        optim={"lr": 1e30, "warmup_epochs": 0.0},
    )
    result = subprocess.run(torchrun(cfg), capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode != 0
    run_dir = tmp_path / "diverged"
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad_step = len(logged) + 1  # the step whose loss was not finite is not logged
    assert f"non-finite loss at step {bad_step}" in result.stderr and bad_step <= 8
    assert all(math.isfinite(r["contrastive_loss"]) and math.isfinite(r["saliency_loss"]) for r in logged)
    # The last checkpoint is the last good step's, complete and loadable.
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{len(logged):08d}" and f"last good checkpoint is {latest}" in result.stderr
    invoke_cli("export", run_dir, "-o", tmp_path / "diverged_export" / "encoder")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_shards: Path, tmp_path: Path) -> None:
    # What SLURM sends before the time limit: the job must save where it is and stop with exit 0.
    cfg = config(tmp_path, tiny_shards, "preempted", ds_config(tmp_path, 0), checkpoint_every=100, data__workers=1)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    proc = subprocess.Popen(
        torchrun(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True
    )
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
