"""The one prepared run for a GPU machine (`make gpu-run`): writes OUT/gpu_run.json and OUT/features.npz.

A GPU is lent for about 15 minutes at a time, one command at most 10 of them, so everything the project
asks of a GPU runs in this one command, within a deadline (530 s), from the folder that
bench/checks/travel.py prepared here (shards of the real photographs, the wheels the image lacks). The
evidence comes first, the checks after, so that a slow start costs a check, not the result:
1. throughput: pretraining end to end from the shards (launch/pretrain.py, one rank, bf16 ZeRO-2,
   compiled, `augment_on: gpu`), ViT-S/16 and ViT-B/16 at 224, batch 256: pairs/s, the share of step time
   spent waiting for data, MFU against the GPU's dense bf16 peak, peak memory, against the issue's targets;
2. quality: ViT-S/16 SSiT and MoCo v3 (`model.saliency=false`) at 256 px (the photographs' size), as many
   steps as fit 75 s each (the plan's quality_s; the step time from the throughput part), exported;
3. features: the frozen CLS features of every graded photograph from both exports and from a random init
   of the same architecture, into features.npz. Back here, `python bench/experiments/quality.py
   --features features.npz` judges them by the CPU benchmark's patient-grouped cross-validation;
4. step: bench/perf/model_step.py, ViT-S/16 and ViT-B/16, bf16, batch 256, eager and compiled, against a
   reference-style step;
5. check: bench/checks/gpu_check.py (collectives on NCCL, ZeRO-2/3 bf16 pretraining with a resume, bf16
   fine-tuning on the train/val/test split of the first graded folder);
6. predict: bench/perf/predict.py, `ssit-dist predict`'s grading loop over the graded photographs (written out
   from their shards) with a ViT-S/16 grader at 224 and 384 px: photographs per second, and the loader's own;
7. host_waits: ViT-S/16 end to end uncompiled, DeepSpeed's throughput timer off (as shipped) and on: what
   its two device syncs per micro-batch cost; then, per step, every read and synchronisation the training
   loop made (bench/checks/sync_count.py, with torch's own sync detection on CUDA).
The JSON is rewritten after each part (a command cut short still brings back what it did); a part that
would end past the deadline is recorded as skipped.

`--smoke` runs every part on CPU at tiny sizes (a tiny ViT, a few steps): tests/bench/test_gpu_run.py runs it in
`make test`, so that this command cannot rot between the times a GPU is lent.

    make gpu-run PY=python3 GPU_OUT=$OUT          # on the GPU machine, .travel carried
    make gpu-run SMOKE=1 TRAVEL=DIR GPU_OUT=DIR   # here
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.perf.pretrain import BF16_PEAK_TFLOPS, end_to_end, flops_per_pair
from ssit_dist.config import PretrainConfig, load_config
from ssit_dist.stage import StageFailed, cli_command, run_stage

ROOT = Path(__file__).resolve().parents[2]  # the repository
# The targets, end to end from shards on one H100/H200 (ViT-S/16 and ViT-B/16 at 224, bf16).
TARGET_PAIRS_PER_S = {"vit_small_patch16_224": 3000, "vit_base_patch16_224": 1500}
TARGET_DATA_WAIT_SHARE = 0.02


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU's, or the CPU smoke run's."""

    archs: tuple[str, ...]  # the step bench's and the throughput part's
    batch: int
    bench_img_size: int  # the step bench's input size
    bench_steps: int
    workers: int  # loader processes of the end-to-end runs
    threads: int  # intra-op threads of the step bench and of each end-to-end rank
    log_every: int  # the end-to-end runs' sync points: on a GPU every one makes the host wait for the device
    bf16: bool
    compile: bool
    quality_config: str
    quality_recipe: tuple[str, ...]  # overrides of the quality runs beside run_dir, data and steps
    quality_s: float  # training seconds per method
    quality_steps: tuple[int, int]  # the least and the most steps of a quality run
    predict_args: tuple[str, ...]  # bench/perf/predict.py's
    deadline_s: float
    device: str


GPU = Plan(
    archs=("vit_small_patch16_224", "vit_base_patch16_224"),
    batch=256,
    bench_img_size=224,
    bench_steps=20,
    workers=8,
    threads=8,
    log_every=5,
    bf16=True,
    compile=True,
    quality_config="launch/configs/ssit_vit_s.yaml",
    quality_recipe=(
        "model.img_size=256",
        "model.compile=true",
        "global_batch=256",
        "data.workers=8",
        "checkpoint_every_minutes=null",
    ),
    quality_s=75,
    quality_steps=(50, 2000),
    predict_args=("--photos", "512", "--batch-size", "64", "--sizes", "224,384", "--workers", "4,8"),
    deadline_s=530,
    device="cuda",
)
SMOKE = Plan(
    archs=("vit_tiny_patch16_224",),
    batch=4,
    bench_img_size=64,
    bench_steps=2,
    workers=1,
    # One: the smoke checks that every part runs, not speed, and shares the cores with the test suite,
    # where a second intra-op thread waits for a busy core at every parallel region.
    threads=1,
    log_every=1,
    bf16=False,
    compile=False,
    quality_config="launch/configs/tiny_cpu.yaml",
    quality_recipe=("global_batch=8", "data.workers=1"),
    quality_s=0,
    quality_steps=(3, 3),
    predict_args=(
        "--photos",
        "8",
        "--batch-size",
        "4",
        "--sizes",
        "64",
        "--workers",
        "1",
        "--arch",
        "vit_tiny_patch16_224",
    ),
    deadline_s=600,
    device="cpu",
)
METHODS = {"ssit": (), "moco_v3": ("model.saliency=false",)}


def split_graded(travel: Path) -> Path:
    """The graded folder travel.py packed split train/val/test (the first it was given)."""
    return travel / "eval" / json.loads((travel / "manifest.json").read_text())["eval_split"]


def check(plan: Plan, travel: Path, work: Path) -> dict:
    """bench/checks/gpu_check.py (it skips itself without CUDA): pretraining on the pretraining shards,
    fine-tuning on the graded folder that travel.py split."""
    command = [sys.executable, str(ROOT / "bench" / "checks" / "gpu_check.py"), "--shards", str(split_graded(travel))]
    command += ["--pretrain-shards", str(travel / "pretrain")]
    return _json_of(command, work / "check.log")


def step(plan: Plan, travel: Path, work: Path) -> dict:
    """bench/perf/model_step.py per architecture: ours eager and compiled against reference-style."""
    out = {}
    for arch in plan.archs:
        command = [sys.executable, str(ROOT / "bench" / "perf" / "model_step.py"), "--device", plan.device]
        command += ["--arch", arch, "--batch", str(plan.batch), "--steps", str(plan.bench_steps)]
        command += ["--img-size", str(plan.bench_img_size), "--threads", str(plan.threads)]
        command += ["--only-bf16", "--force-bf16"] if plan.bf16 else []
        command += ["--compile"] if plan.compile else []
        out[arch] = _json_of(command, work / f"step_{arch}.log")
    return out


def predict(plan: Plan, travel: Path, work: Path) -> dict:
    """bench/perf/predict.py over the graded photographs of the split graded folder, written out as files."""
    command = [sys.executable, str(ROOT / "bench" / "perf" / "predict.py"), "--photos-from", str(split_graded(travel))]
    return _json_of([*command, *plan.predict_args], work / "predict.log")


def throughput(plan: Plan, travel: Path, work: Path) -> dict:
    """End-to-end pretraining from the shards, one rank, per architecture, against the targets."""
    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    out: dict = {"device": name, "bf16_peak_tflops": peak}
    for arch in plan.archs:
        try:
            run = end_to_end(
                travel / "pretrain", work, 1, plan.threads, 2, plan.bench_steps, "gpu",
                arch, plan.batch, plan.bf16, plan.compile, plan.workers, plan.log_every,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:  # one that fails (memory) does not end the others
            out[arch] = {"failed": f"exit {e.returncode}"}
            continue
        run["data_wait_share"] = round(run["data_wait_s"] / run["step_s"], 4)
        if peak:
            run["mfu"] = round(run["pairs_per_s"] * flops_per_pair(arch, plan.device) / (peak * 1e12), 3)
        if arch in TARGET_PAIRS_PER_S:
            run["target_pairs_per_s"] = TARGET_PAIRS_PER_S[arch]
            run["meets_targets"] = (
                run["pairs_per_s"] >= TARGET_PAIRS_PER_S[arch] and run["data_wait_share"] < TARGET_DATA_WAIT_SHARE
            )
        out[arch] = run
    return out


def host_waits(plan: Plan, travel: Path, work: Path, measured: dict) -> dict:
    """The first architecture end to end, uncompiled (a compile per run would cost more than the runs), with
    DeepSpeed's throughput timer off (the shipped configs) and on (its two device syncs per micro-batch):
    what the host waiting for the device costs in pairs/s. `measured`: the throughput part's run of that
    architecture, which is the timer-off run itself where the plan does not compile."""
    arch, out = plan.archs[0], {}
    for timer in (False, True):
        if not timer and not plan.compile and "pairs_per_s" in measured:
            run = measured
        else:
            run = end_to_end(
                travel / "pretrain", work, 1, plan.threads, 2, plan.bench_steps, "gpu",
                arch, plan.batch, plan.bf16, False, plan.workers, plan.log_every, throughput_timer=timer,
            )  # fmt: skip
        out[f"throughput_timer_{'on' if timer else 'off'}"] = run
    off, on = out["throughput_timer_off"]["pairs_per_s"], out["throughput_timer_on"]["pairs_per_s"]
    out["timer_on_over_off"] = round(on / off, 3)
    # Per step, everything that made the training loop's host wait (bench/checks/sync_count.py); on CUDA
    # with torch's own sync detection. As shipped: the throughput timer off.
    overrides = [
        f"run_dir={work / 'sync_count'}",
        f"data.shards=[{travel / 'pretrain'}]",
        f"model.arch={arch}",
        "model.img_size=224",
        "model.compile=false",
        f"global_batch={plan.batch}",
        f"data.workers={plan.workers}",
        "epochs=1",
        f"steps_per_epoch={plan.bench_steps}",
        f"log_every={plan.log_every}",
        "checkpoint_every_minutes=null",
        f"checkpoint_every={10**6}",
    ]
    command = [sys.executable, "-m", "bench.checks.sync_count", "--config", str(ROOT / plan.quality_config)]
    out["host_waits_per_step"] = _json_of([*command, *overrides], work / "sync_count.log")
    return {"arch": arch, **out}


def quality(plan: Plan, travel: Path, work: Path, step_s: float | None) -> dict:
    """SSiT and MoCo v3 pretrained on TRAVEL/pretrain, exported; features of every graded photograph."""
    low, high = plan.quality_steps
    # At 256 px a ViT-S/16 sees 256 tokens against 196 at 224: about 1.35x the step time.
    steps = low if step_s is None else int(min(high, max(low, plan.quality_s / (step_s * 256 / 196 * 1.05))))
    out: dict = {"steps": steps, "config": plan.quality_config, "recipe": list(plan.quality_recipe)}
    exports = {}
    for method, extra in METHODS.items():
        started = time.perf_counter()
        run_dir = work / "runs" / method
        epochs = max(1, steps // 50)
        overrides = [
            f"run_dir={run_dir}",
            f"data.shards=[{travel / 'pretrain'}]",
            f"epochs={epochs}",
            f"steps_per_epoch={steps // epochs}",
            f"optim.warmup_epochs={epochs * 0.1:.3f}",
            f"checkpoint_every={steps}",
        ]
        command = cli_command(
            "pretrain", "--config", str(ROOT / plan.quality_config), *plan.quality_recipe, *overrides, *extra
        )
        run_stage(f"pretrain {method}", command, work / f"quality_{method}.log")
        run_stage(
            f"export {method}", cli_command("export", str(run_dir), "-o", str(work / method)), work / "export.log"
        )
        exports[method] = str(work / f"{method}.safetensors")
        out[method] = _losses(run_dir) | {"wall_s": round(time.perf_counter() - started, 1)}
    return out | {"exports": exports}


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "contrastive_loss" in r]
    losses = [r["contrastive_loss"] for r in rows]
    return {
        "steps": len(rows),
        "contrastive_first20": round(float(np.mean(losses[:20])), 4),
        "contrastive_last20": round(float(np.mean(losses[-20:])), 4),
        "pairs_per_s": round(float(np.median([r["pairs_per_s"] for r in rows[1:] or rows])), 1),
    }


def features(plan: Plan, travel: Path, exports: dict[str, str], out: Path, img_size: int) -> dict:
    """Frozen CLS features of every graded photograph from each export and from a random init of the
    same architecture, normalised as the pretraining saw its photographs; saved as one features file."""
    from accelerate import Accelerator

    from ssit_dist.data.index import read_index
    from ssit_dist.eval.evaluate import frozen_features
    from ssit_dist.eval.features_file import save_features
    from ssit_dist.models.pretrained import load_encoder

    accelerator = Accelerator(cpu=plan.device == "cpu", mixed_precision="bf16" if plan.bf16 else "no")
    stats = read_index(travel / "pretrain")
    folders = sorted(p for p in (travel / "eval").iterdir() if (p / "_info.json").is_file())
    first = load_encoder(exports["ssit"], img_size)[1]
    torch.manual_seed(0)
    encoders = {m: load_encoder(path, img_size)[0] for m, path in exports.items()}
    encoders["random"] = load_encoder("random", img_size, first.arch, first.timm_kwargs)[0]
    rows = {m: frozen_features(e, folders, img_size, stats.mean, stats.std, accelerator) for m, e in encoders.items()}
    keys = rows["ssit"].keys
    if any(r.keys != keys for r in rows.values()):
        raise RuntimeError("the encoders' features came back in different orders")
    path = save_features(out / "features.npz", keys, {m: r.features for m, r in rows.items()})
    return {"file": path.name, "photographs": len(keys), "missing": rows["ssit"].missing, "methods": list(rows)}


def _json_of(command: list[str], log: Path) -> dict:
    """The last JSON object a bench script printed, or why there is none."""
    try:
        run_stage(log.stem, command, log)
    except StageFailed as e:
        return {"failed": str(e)[-1500:]}
    text = log.read_text()
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1 if start >= 0 else text.find("{") :])
    except ValueError:
        return {"failed": f"no JSON in {log.name}: {text[-500:]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--travel", type=Path, default=ROOT / ".travel", help="bench/checks/travel.py's folder")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu_out", help="gpu_run.json and features.npz")
    parser.add_argument("--work", type=Path, default=None, help="runs and logs (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="every part on CPU at tiny sizes")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run it on a GPU machine, or --smoke on CPU")
    if not (args.travel / "pretrain" / "_info.json").is_file():
        raise SystemExit(f"{args.travel}: no prepared shards; run bench/checks/travel.py first")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        return run_parts(plan, args.travel.resolve(), args.work or Path(tmp), args.out)


def run_parts(plan: Plan, travel: Path, work: Path, out: Path) -> int:
    """Each part in turn, the JSON rewritten after each (a run cut short still brings back what it did)."""
    started = time.perf_counter()
    report: dict = {"plan": plan.__dict__, "travel": json.loads((travel / "manifest.json").read_text())}
    report["travel"].pop("wheels", None)

    def part(name: str, expected_s: float, fn: Callable[[], dict]) -> dict:
        elapsed = time.perf_counter() - started
        if elapsed + expected_s > plan.deadline_s:
            report[name] = {"skipped": f"{elapsed:.0f} s gone: {expected_s:.0f} more would pass {plan.deadline_s:.0f}"}
        else:
            part_started = time.perf_counter()
            try:
                report[name] = fn() | {"wall_s": round(time.perf_counter() - part_started, 1)}
            except StageFailed as e:  # the stage's log tail says why; the remaining parts still run
                report[name] = {"failed": str(e)[-2000:]}
        report["wall_s"] = round(time.perf_counter() - started, 1)
        (out / "gpu_run.json").write_text(json.dumps(report, indent=1) + "\n")
        return report[name]

    # The evidence first (the quality runs take their step count from the throughput part), the checks
    # after: with a slow start it is the GPU check that the deadline drops, not the result.
    measured = part("throughput", 150, lambda: throughput(plan, travel, work)).get(plan.archs[0], {})
    trained = part("quality", 2 * plan.quality_s + 120, lambda: quality(plan, travel, work, measured.get("step_s")))
    if "exports" in trained:
        img_size = load_config(ROOT / plan.quality_config, list(plan.quality_recipe), PretrainConfig).model.img_size
        part("features", 40, lambda: features(plan, travel, trained["exports"], out, img_size))
    part("step", 100, lambda: step(plan, travel, work))
    part("predict", 60, lambda: predict(plan, travel, work))
    part("check", 120, lambda: check(plan, travel, work))
    part("host_waits", 90, lambda: host_waits(plan, travel, work, measured))
    print(json.dumps(report, indent=1))
    failed = [k for k, v in report.items() if isinstance(v, dict) and "failed" in v]
    return 1 if failed or "features" not in report else 0


if __name__ == "__main__":
    sys.exit(main())
