"""Tools that print JSON on stdout keep every other word on stderr, however much their input makes them say:
a caller pipes stdout into a JSON parser (`... | jq`, `json.loads(result.stdout)`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from ssit_dist.data.packing.inputs import sample_key
from ssit_dist.eval.features_file import save_features

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]


def test_quality_bench_says_skipped_rows_on_stderr_in_one_summary(graded_dir: Path, tmp_path: Path) -> None:
    """bench/experiments/quality.py on EyePACS's own labels file beside a tenth of its photographs, one row
    with a bad grade among them: stdout is the JSON alone; stderr says each kind of skipped row once."""
    with open(graded_dir / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    present = [r for g in "01234" for r in rows if r["grade"] == g][::5]  # 12 per grade
    folder = tmp_path / "eyepacs"
    folder.mkdir()
    for row in present:
        (folder / row["image"]).symlink_to(graded_dir / row["image"])
    absent = [f"{90000 + k}_{'left' if k % 2 else 'right'}" for k in range(10 * len(present))]
    stem = {r["image"]: r["image"].rsplit(".", 1)[0] for r in present}
    lines = [f"{stem[r['image']]},{r['grade']}" for r in present] + [f"{name},0" for name in absent]
    lines[0] = f"{stem[present[0]['image']]},7"  # a bad grade: that photograph is left out
    (folder / "trainLabels.csv").write_text("image,level\n" + "\n".join(lines) + "\n")
    keys = [f"eyepacs/{sample_key(r['image'])}" for r in present]
    features = np.random.default_rng(0).normal(size=(len(keys), 8))
    save_features(tmp_path / "features.npz", keys, {"ssit": features})
    command = [sys.executable, str(ROOT / "bench" / "experiments" / "quality.py"), "--features",
               str(tmp_path / "features.npz"), "--images", str(tmp_path), "--eval-data", str(folder),
               "--labels", str(folder / "trainLabels.csv"), "--resamples", "10"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # nothing but the JSON
    assert "ssit" in report["evaluation"]["methods"], list(report["evaluation"])
    said = [line for line in result.stderr.splitlines() if "trainLabels.csv" in line]
    assert len(said) == 2, result.stderr
    assert "skipped 1 rows of" in said[0] and "is outside 0-4" in said[0]
    assert f"skipped {len(absent)} rows of" in said[1] and f"naming a photograph not under {folder}" in said[1]
    assert sum(name in result.stderr for name in absent) == 3  # the first few, then the count


def test_commands_that_print_json_print_only_json(shards: Path) -> None:
    """`ssit-dist info --json` (DeepSpeed logs to stdout from its import on) and `ssit-dist data-plan`."""
    json.loads(run_cli("info", "--json").stdout)
    plan = run_cli("data-plan", shards, "--world", 2, "--workers", 1, "--global-batch", 8)
    assert json.loads(plan.stdout)
