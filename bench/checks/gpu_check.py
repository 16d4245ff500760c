"""GPU check: the multi-GPU code paths on a real CUDA device, end to end. Prints one JSON object.

On CUDA, with NCCL at world size 1 (the process group exists, so no collective is skipped):
1. every collective helper of ssit_dist.dist on the GPU, and a CPU tensor through the same group;
2. SSiT pretraining of a small ViT for a few steps under ds_configs/zero2_bf16 and zero3_bf16 (DeepSpeed's
   fused Adam), stopped by SIGTERM once and resumed to the end, then exported;
3. fine-tuning one epoch from the export with Accelerate in bf16, evaluated on val and test.
Without CUDA it prints a skip line and exits 0.

    python bench/checks/gpu_check.py --shards shards/gpucheck   # labelled shards (ssit-dist shard --labels --split)
        [--pretrain-shards DIR]   # shards with saliency maps, where --shards has none (--saliency none)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository


def collectives() -> dict:
    """Run inside a launched process: each dist.py helper under the real process group."""
    from ssit_dist import dist

    device = dist.init_process_group(60)
    out = {"backend": str(torch.distributed.get_backend()), "world": dist.world_size(), "device": str(device)}
    dist.barrier(device)
    out["any_ranks"] = dist.any_ranks([True, False], device)
    out["mean_over_ranks"] = dist.mean_over_ranks(2.5, device)
    out["broadcast_from_zero"] = dist.broadcast_from_zero({"tag": "step1"}, device)
    out["gather_objects"] = dist.gather_objects(("host", []), device)
    out["on_rank_zero"] = dist.on_rank_zero(lambda: 7, device, "work")
    x = torch.arange(4.0, device=device)
    out["all_gather_cat"] = dist.all_gather_cat(x).tolist()
    y = torch.ones(3, device=device, requires_grad=True)
    dist.sum_over_ranks_differentiable(y * 2).sum().backward()
    out["differentiable_grad"] = y.grad.tolist()
    cpu = torch.ones(2)
    torch.distributed.all_reduce(cpu)  # a CPU tensor: must go through gloo, not crash NCCL
    out["cpu_tensor_all_reduce"] = cpu.tolist()
    torch.distributed.destroy_process_group()
    return out


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)


def _tail(log: Path) -> str:
    return log.read_text()[-1500:] if log.is_file() else ""


def pretrain_stage(stage: int, shards: Path, work: Path, env: dict) -> dict:
    import yaml

    run_dir = work / f"zero{stage}"
    cfg = {
        "run_dir": str(run_dir),
        "ds_config": str(ROOT / "ds_configs" / f"zero{stage}_bf16.json"),
        "global_batch": 32,
        "epochs": 1,
        "steps_per_epoch": 12,
        "checkpoint_every": 4,
        "seed": 0,
        "dist_timeout_s": 300,
        "model": {
            "arch": "vit_small_patch16_224",
            "img_size": 64,
            "proj_hidden": 512,
            "proj_dim": 128,
            "timm_kwargs": {"patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3},
        },
        "data": {"shards": [str(shards)], "workers": 2},
        "optim": {"warmup_epochs": 0.2},
    }
    path = work / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(_port()),
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(path),
    ]
    result: dict = {"ok": False}
    started = time.perf_counter()
    # Run until 5 steps are logged, then SIGTERM (SLURM's warning): it must save and exit 0.
    log = work / f"zero{stage}_first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while (
            not (metrics.is_file() and metrics.read_text().count("\n") >= 5)
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        if proc.poll() is None:
            # To the rank processes, as srun forwards it (torchrun's own agent exits non-zero when
            # signalled even after every rank saved).
            import psutil

            for child in psutil.Process(proc.pid).children(recursive=True):
                child.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    result["first_exit"] = proc.returncode
    first = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] if metrics.is_file() else []
    result["stopped_at"] = first[-1]["step"] if first else None
    second = _run(cmd, env, 300, work / f"zero{stage}_resume.log")
    result["resume_exit"] = second.returncode
    if second.returncode != 0:
        result["log"] = _tail(work / f"zero{stage}_resume.log")
        return result
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    result["steps"] = [r["step"] for r in rows]
    result["contrastive_loss"] = [round(r["contrastive_loss"], 4) for r in rows]
    result["saliency_loss"] = [round(r["saliency_loss"], 4) for r in rows]
    result["pairs_per_s_last"] = rows[-1]["pairs_per_s"]
    result["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rows)
    result["seconds"] = round(time.perf_counter() - started, 1)
    from safetensors.torch import load_file

    from ssit_dist.train.export import export_encoder

    weights, _ = export_encoder(run_dir, work / f"export{stage}" / "encoder")
    result["export_tensors"] = len(load_file(str(weights)))
    result["ok"] = (
        result["first_exit"] == 0
        and result["steps"] == list(range(1, 13))
        and all(map(_finite, result["contrastive_loss"] + result["saliency_loss"]))
    )
    if not result["ok"]:
        result["log"] = _tail(work / f"zero{stage}_first.log")
    return result


def finetune(shards: Path, encoder: Path, work: Path, env: dict) -> dict:
    out = work / "finetune"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(_port()),
        str(ROOT / "launch" / "finetune.py"),
        f"train={shards}",
        f"init={encoder}",
        f"run_dir={out}",
        "epochs=1",
        "img_size=64",
        "mixed_precision=bf16",
        "global_batch=16",
        "workers=2",
        "dist_timeout_s=300",
    ]
    started = time.perf_counter()
    run = _run(cmd, env, 400, work / "finetune.log")
    result: dict = {"exit": run.returncode, "seconds": round(time.perf_counter() - started, 1)}
    if run.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        result.update(
            mixed_precision=report["mixed_precision"],
            processes=report["processes"],
            val=_brief(report["val"]),
            test=_brief(report.get("test", {})),
        )
    else:
        result["log"] = _tail(work / "finetune.log")
    result["ok"] = run.returncode == 0 and result.get("mixed_precision") == "bf16"
    return result


def _brief(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("samples", "accuracy", "qwk")}


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _port() -> int:
    from ssit_dist.dist import free_port

    return free_port()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=ROOT / "shards" / "gpucheck")
    parser.add_argument("--pretrain-shards", type=Path, default=None, help="default: --shards")
    parser.add_argument("--collectives", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collectives:
        print("COLLECTIVES " + json.dumps(collectives()))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: the GPU check runs only where a GPU is"}))
        return 0
    import deepspeed

    report: dict = {
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        },
        "device": torch.cuda.get_device_name(0),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "1",
                "--master_port",
                str(_port()),
                __file__,
                "--collectives",
            ],
            env,
            300,
            work / "collectives.log",
        )
        lines = [x for x in (work / "collectives.log").read_text().splitlines() if x.startswith("COLLECTIVES ")]
        c = json.loads(lines[-1][len("COLLECTIVES ") :]) if lines else {"log": _tail(work / "collectives.log")}
        c["ok"] = (
            run.returncode == 0
            and c.get("any_ranks") == [True, False]
            and c.get("all_gather_cat") == [0, 1, 2, 3]
            and c.get("cpu_tensor_all_reduce") == [1.0, 1.0]
            and c.get("differentiable_grad") == [2.0] * 3
        )
        report["collectives"] = c
        report["pretrain"] = {
            f"zero{stage}_bf16": pretrain_stage(stage, args.pretrain_shards or args.shards, work, env)
            for stage in (2, 3)
        }
        encoder = work / "export2" / "encoder.safetensors"
        report["finetune"] = (
            finetune(args.shards, encoder, work, env) if encoder.is_file() else {"ok": False, "skipped": "no export"}
        )
    report["ok"] = all(part["ok"] for part in [report["collectives"], *report["pretrain"].values(), report["finetune"]])
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
