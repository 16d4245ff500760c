"""An installed ssit-dist, not a source tree: a wheel built from the repository, installed into a fresh
venv (the heavy dependencies come from the test venv's site-packages through a .pth line), pretrains
for two steps on 2 ranks from a folder outside the repository, with the repository's tiny_cpu.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # builds a wheel and a venv

ROOT = Path(__file__).resolve().parents[1]


def run(*command: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_a_wheel_pretrains_outside_the_repository(shards: Path, tmp_path: Path) -> None:
    # Built from a copy of what a wheel is made of: setuptools writes build/ into the folder it builds.
    source = tmp_path / "source"
    for name in ("ssit_dist", "ds_configs", "launch"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    run(*pip_wheel, "-w", tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("ssit_dist-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = "1"
    where = run(
        python, "-c", "import ssit_dist.config as c; print(c.__file__); print(c.DS_CONFIGS)", cwd=elsewhere, env=env
    )
    module, ds_configs = where.split()
    assert module.startswith(str(site)) and ds_configs.startswith(str(site))  # the wheel's, not the repo's
    shipped = Path(ds_configs).parent
    assert (shipped / "ds_configs" / "zero0_fp32.json").is_file() and (shipped / "configs" / "tiny_cpu.yaml").is_file()
    assert (shipped / "slurm" / "pretrain.sbatch").is_file() and (shipped / "slurm" / "finetune.sbatch").is_file()

    run(
        venv / "bin" / "ssit-dist",
        "pretrain",
        "--nproc",
        2,
        "--config",
        ROOT / "launch" / "configs" / "tiny_cpu.yaml",
        "run_dir=run",
        f"data.shards=[{shards}]",
        "global_batch=8",
        "epochs=1",
        "steps_per_epoch=2",
        "model.img_size=32",
        "model.proj_hidden=32",
        "model.proj_dim=16",
        "model.timm_kwargs={patch_size: 8, embed_dim: 24, depth: 1, num_heads: 2}",
        "data.shuffle_buffer=8",
        "optim.lr=5e-4",
        cwd=elsewhere,
        env=env,
    )
    rows = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (
        json.loads((elsewhere / "run" / "fingerprint.json").read_text())["ds_config"]["zero_optimization"]["stage"] == 0
    )
