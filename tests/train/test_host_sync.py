"""The training loops' hot paths never wait for the device between sync points.

Two real gloo ranks each run `pretrain` (real DeepSpeed engine, real shards of real photographs), or
`finetune` (real Accelerate), with every read of a tensor's value and every device synchronisation counted
(bench/checks/sync_count.py, the counter `make gpu-run` runs on a GPU). On a GPU each blocks the host until
the device has caught up; on the CPU nothing blocks, so the count is what can be tested here, and it is
the same code that runs on a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import yaml

from bench.checks.sync_count import FINETUNE_EPOCH, PRETRAIN_LOOP, count, syncs
from gloo_ranks import start_ranks
from ssit_dist.dist import free_port

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_uses_only_streams_the_count_sees() -> None:
    uses = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "ssit_dist").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "torch.Stream" in line or "torch.Event" in line
    ]
    assert not uses, f"torch.Stream/torch.Event cannot be counted (sync_count.py); use torch.cuda's: {uses}"


def _rank(rank: int, port: int, cfg: str, out: str, task: str = "pretrain") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from ssit_dist.config import FinetuneConfig, load_config
    from ssit_dist.dist import shutdown
    from ssit_dist.train import finetune_loop
    from ssit_dist.train.finetune import finetune
    from ssit_dist.train.pretrain import pretrain

    # A progress line after every batch, and the rank's log in a file: what the user sees, read by the test.
    finetune_loop.PROGRESS_EVERY_S = 0.0
    logging.basicConfig(filename=Path(out, f"rank{rank}.log"), level=logging.INFO, format="%(name)s: %(message)s")
    counts: Counter = Counter()
    count(counts, PRETRAIN_LOOP if task == "pretrain" else FINETUNE_EPOCH)
    try:
        if task == "pretrain":
            pretrain(load_config(cfg))
        else:
            finetune(load_config(cfg, kind=FinetuneConfig))
    except Exception as e:  # what this rank raised, for the test to read
        Path(out, f"rank{rank}.error").write_text(f"{type(e).__name__}: {e}")
    finally:
        shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(counts))


def write_config(tmp_path: Path, shards: Path, name: str, **fields: object) -> Path:
    body = {
        "run_dir": str(tmp_path / name),
        "ds_config": str(ROOT / "ds_configs" / "zero2_bf16.json"),
        "global_batch": 4,
        "micro_batch": 2,
        "epochs": 1,
        "steps_per_epoch": 8,
        "checkpoint_every": 8,
        "seed": 0,
        "model": {
            "img_size": 32,
            "proj_hidden": 32,
            "proj_dim": 16,
            "timm_kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2},
        },
        "data": {"shards": [str(shards)], "workers": 1, "shuffle_buffer": 4},
    }
    for key, value in fields.items():  # section__field sets a field of a section
        section, _, field = key.partition("__")
        (body[section] if field else body)[field or section] = value  # type: ignore[index]
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(body))
    return cfg


def start(cfg: Path, out: Path, task: str = "pretrain") -> mp.ProcessContext:
    out.mkdir()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    args = (free_port(), str(cfg), str(out), task)
    ranks = start_ranks(_rank, args, join=False)
    assert ranks is not None
    return ranks


def counted_run(cfg: Path, out: Path, task: str = "pretrain") -> dict:
    """Rank 0's counts of a run of `task` on 2 ranks."""
    start(cfg, out, task).join()
    assert not list(out.glob("*.error")), [e.read_text() for e in out.glob("*.error")]
    return json.loads((out / "rank0.json").read_text())


def run(tmp_path: Path, shards: Path, name: str, **fields: object) -> tuple[dict, list[dict]]:
    counts = counted_run(write_config(tmp_path, shards, name, **fields), tmp_path / f"{name}_counts")
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return counts, metrics


def ours(counts: dict) -> int:
    return sum(n for key, n in counts.items() if key.startswith("ssit_dist:"))


def test_the_loop_reads_the_device_once_per_log_interval(shards: Path, tmp_path: Path) -> None:
    counts, metrics = run(tmp_path, shards, "every4", log_every=4)
    # 8 steps, log_every 4: sync points after steps 4 and 8, plus the one agreement on the run's very
    # first batch (no earlier batch to fall back on): 3 reads of the device, whatever the step count.
    assert ours(counts) == 3, counts
    assert syncs(counts) == {}, counts  # and no synchronisation at all: DeepSpeed's throughput timer is off
    assert [r["step"] for r in metrics] == list(range(1, 9))  # every step still reported, at the sync points
    assert all(r["contrastive_loss"] > 0 and r["saliency_loss"] > 0 for r in metrics)
    assert all(r["pairs_per_s"] == metrics[0]["pairs_per_s"] for r in metrics[:4])  # the interval's average
    # What DeepSpeed's ZeRO-2 optimizer reads itself (its overflow check and gradient-norm test, three
    # reads per step in 0.19) and the DataLoader's seed draw are not the loop's; they must not change
    # with the loop's log interval.
    deepspeed = sum(n for key, n in counts.items() if not key.startswith("ssit_dist:"))

    every_step, _ = run(tmp_path, shards, "every1", log_every=1)
    assert ours(every_step) == 9, every_step  # the counter sees each read: one per step, plus the first batch
    assert sum(n for key, n in every_step.items() if not key.startswith("ssit_dist:")) == deepspeed


def test_the_count_sees_deepspeeds_throughput_timer_when_a_config_turns_it_on(shards: Path, tmp_path: Path) -> None:
    # The shipped configs turn the timer off. On, it syncs the device at the start (forward) and the end
    # (step) of every micro-batch from its third on (it starts timing at global step 2): 2 x 6 of 8 steps.
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["timers"] = {"throughput": {"enabled": True}}
    (tmp_path / "timer_on.json").write_text(json.dumps(ds))
    counts, _ = run(tmp_path, shards, "timer_on", log_every=4, ds_config=str(tmp_path / "timer_on.json"))
    assert syncs(counts) == {"deepspeed:accelerator.synchronize": 2 * (8 - 2)}, counts
    assert ours(counts) == 3, counts


def test_the_device_augmentation_path_trains_without_reading_the_device(shards: Path, tmp_path: Path) -> None:
    # data.augment_on=gpu: workers hand over JPEG bytes and drawn parameters, the training process decodes
    # and augments; everything it decides per sample comes from host-side numbers, so the count stays 3.
    counts, metrics = run(tmp_path, shards, "device_aug", log_every=4, data__augment_on="gpu")
    assert ours(counts) == 3, counts
    assert syncs(counts) == {}, counts
    assert [r["step"] for r in metrics] == list(range(1, 9))
    assert all(0 < r["contrastive_loss"] < 10 and 0 < r["saliency_loss"] < 10 for r in metrics)


def test_a_rank_whose_loader_dies_stops_every_rank_at_the_next_sync_point(shards: Path, tmp_path: Path) -> None:
    # Between sync points nothing is agreed, so a rank whose loader died keeps joining the collectives
    # on its last good batch; the sync point stops every rank before anything more is reported or saved.
    cfg = write_config(tmp_path, shards, "dies", steps_per_epoch=400, log_every=4, checkpoint_every=4)
    out = tmp_path / "dies_counts"
    ranks = start(cfg, out)
    metrics, deadline = tmp_path / "dies" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 8):
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.05)
    import psutil

    for worker in psutil.Process(ranks.pids()[1]).children(recursive=True):  # rank 1's loader worker
        worker.kill()
    while not ranks.join(timeout=120):
        pass
    errors = {r: (out / f"rank{r}.error").read_text() for r in range(2)}
    # torch names the dead worker, or the batch it had queued is read first and the trainer says the same
    # (tests/data/loading/test_prefetch.py, where that order is made certain). A raw socket error, which this
    # test accepted before, stays accepted here.
    named = ("DataLoader worker (pid(s)", "died before its batch was read")
    assert any(text in errors[1] for text in named) or errors[1].startswith("Connection"), errors
    assert "the data loader failed on another rank" in errors[0], errors
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(logged) % 4 == 0 and len(logged) < 400  # reported only at sync points, stopped long before the end
    latest = (tmp_path / "dies" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{len(logged):08d}"  # nothing saved after the last agreed step


def test_a_finetuning_epoch_never_waits_for_the_device(labelled_shards: Path, tmp_path: Path) -> None:
    # Each epoch's losses add up on the device and are read once, after the epoch (train_epochs): nothing
    # inside an epoch reads a tensor or synchronises, whatever the number of batches (7 per rank per
    # epoch here, 2 epochs), progress lines after every batch included.
    body = {
        "run_dir": str(tmp_path / "finetune"),
        "train": f"{labelled_shards}:train",
        "val": f"{labelled_shards}:val",
        "img_size": 32,
        "timm_kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2},
        "epochs": 2,
        "global_batch": 4,
        "workers": 0,
        "lr": 0.001,
    }
    cfg = tmp_path / "finetune.yaml"
    cfg.write_text(yaml.safe_dump(body))
    counts = counted_run(cfg, tmp_path / "finetune_counts", task="finetune")
    epochs = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 < e["train_loss"] < 100 for e in epochs)
    assert syncs(counts) == {}, counts
    assert ours(counts) == 0, counts
    logs = [(tmp_path / "finetune_counts" / f"rank{r}.log").read_text() for r in (0, 1)]
    shown = re.findall(r"epoch (\d): batch (\d)/7 \((\d+)%\), [\d.]+/s, about \d+ s left", logs[0])
    assert [(e, b) for e, b, _ in shown] == [(e, b) for e in "12" for b in "123456"], logs[0]
    assert [int(p) for _, b, p in shown[:6]] == [100 * int(b) // 7 for b in "123456"]
    assert ": batch " not in logs[1], logs[1]  # process 0 alone
