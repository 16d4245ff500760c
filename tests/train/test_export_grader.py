"""`ssit-dist export` of a fine-tuning run's grader: the timm folder that plain timm, in a process without
ssit_dist, turns into the same classifier (logits included), its config and model card, the grader files
layout, and the refusals. Real shards packed from real photographs; the run folder written in this
process by fine-tuning's own functions (tests/helpers/tiny_grader.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_grader import SIZE, fixed_input, pack_graded, write_run

from conftest import invoke_cli
from ssit_dist.atomic import write_json
from ssit_dist.data.index import read_index
from ssit_dist.models.grader import Grader
from ssit_dist.models.grader_files import GraderFileError, open_grader
from ssit_dist.train.export import export_grader

# What plain timm runs in the other process: no ssit_dist on its path (-I ignores the environment and the
# working folder, -S the site .pth files, among them the editable install's), only site-packages itself.
PLAIN_TIMM = """
import importlib.util, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("ssit_dist") is None, "ssit_dist is importable"
import timm
from safetensors.torch import load_file, save_file
model = timm.create_model("local-dir:" + sys.argv[2], pretrained=True).eval()
data = timm.data.resolve_data_config({}, model=model)
x = load_file(sys.argv[3])["x"]
save_file({"logits": model(x).detach().contiguous()}, sys.argv[4])
print(data["input_size"], data["interpolation"], data["crop_pct"], [round(m, 6) for m in data["mean"]])
"""


@pytest.fixture(scope="module")
def packed(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_graded(graded_dir, tmp_path_factory.mktemp("packed"))


@pytest.fixture(scope="module")
def runs(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run per pooling: token and avg regression graders, a cls+avg classification grader."""
    root = tmp_path_factory.mktemp("finetune")
    write_run(root / "token", packed, "token")
    write_run(root / "avg", packed, "avg")
    write_run(root / "cls+avg", packed, "cls+avg", "classification")
    return {pool: root / pool for pool in ("token", "avg", "cls+avg")}


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {pool: export_grader(runs[pool], out / f"timm_{pool}", layout="timm")[0] for pool in ("token", "avg")}


def logits(grader: Grader, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return grader(x)


@pytest.mark.multiprocess
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_plain_timm_gives_the_graders_logits(
    pool: str, runs: dict[str, Path], exported: dict[str, Path], tmp_path: Path
) -> None:
    """timm.create_model("local-dir:...", pretrained=True) in a process where ssit_dist cannot be imported
    gives the logits of the grader `ssit-dist predict` opens from the run folder, and the preprocessing
    in its data config."""
    x = fixed_input()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    site = sysconfig.get_paths()["purelib"]
    args = [site, exported[pool], tmp_path / "x.safetensors", tmp_path / "logits.safetensors"]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PLAIN_TIMM, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    grader, info = open_grader(runs[pool])
    assert theirs.shape == (3, 1)
    # The same weights through the same ops, in another process: equal up to float32 rounding of kernels
    # that may split their work differently (1e-5 on logits of order 1).
    torch.testing.assert_close(theirs, logits(grader, x), rtol=0, atol=1e-5)
    mean = [round(m, 6) for m in info.mean]
    assert done.stdout.strip() == f"(3, {SIZE}, {SIZE}) bilinear 1.0 {mean}"


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_folder_opens_as_the_run_grader(pool: str, runs: dict[str, Path], exported: dict[str, Path]) -> None:
    (grader, info), (ours, theirs) = open_grader(runs[pool]), open_grader(exported[pool])
    torch.testing.assert_close(logits(ours, fixed_input()), logits(grader, fixed_input()), rtol=0, atol=0)
    assert theirs.source == str(exported[pool])
    same = ("arch", "timm_kwargs", "img_size", "objective", "num_classes", "pool", "mean", "std", "thresholds")
    assert all(getattr(theirs, k) == getattr(info, k) for k in same)
    assert (theirs.crop_size, theirs.jpeg_quality) == (info.crop_size, info.jpeg_quality) == (64, 90)


def test_config_and_model_card(exported: dict[str, Path], runs: dict[str, Path], packed: Path) -> None:
    config = json.loads((exported["avg"] / "config.json").read_text())
    index = read_index(packed)
    assert config["num_classes"] == 1 and config["pretrained_cfg"]["num_classes"] == 1
    assert config["model_args"]["global_pool"] == "avg" and config["model_args"]["fc_norm"] is False
    assert "fc_norm" not in json.loads((exported["token"] / "config.json").read_text())["model_args"]
    assert config["pretrained_cfg"]["mean"] == index.mean and config["pretrained_cfg"]["std"] == index.std
    assert config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    grader = config["ssit_dist"]
    assert grader["preprocessing"] == {"crop": "fundus_disc", "size": 64, "quality": 90}
    assert (grader["objective"], grader["num_classes"], grader["thresholds"]) == ("regression", 5, [0.5, 1.5, 2.5, 3.5])
    card = (exported["avg"] / "README.md").read_text()
    report = json.loads((runs["avg"] / "report.json").read_text())
    for split in ("val", "test"):
        qwk = report[split]["intervals"]["qwk"]  # fine-tuning's patient-bootstrap interval of its QWK
        low, high = qwk["ci95"]
        shown = "undefined" if qwk["value"] is None else f"{qwk['value']:.4f} (95% CI {low:.4f} to {high:.4f})"
        assert f"| {split} | {report[split]['samples']} | {shown} |" in card
    assert "Intervals: 95%, from 1,000 bootstrap resamples of patients." in card
    assert all(h in card for h in index.splits["train"].sha256 + index.splits["test"].sha256)
    assert "| started from | random encoder |" in card
    assert "JPEG quality 90" in card and "cropped to a square of 64 px" in card


def test_model_card_of_a_run_without_intervals_says_so(runs: dict[str, Path], tmp_path: Path, packed: Path) -> None:
    """A run from before fine-tuning reported intervals: the card gives the values and says where intervals
    come from instead of inventing them."""
    run = tmp_path / "run"
    write_run(run, packed, "token")
    report = json.loads((run / "report.json").read_text())
    for split in ("val", "test"):
        del report[split]["intervals"]
    report["test"]["qwk"] = 0.61
    write_json(run / "report.json", report)
    card = (export_grader(run, tmp_path / "timm", layout="timm")[0] / "README.md").read_text()
    assert f"| test | {report['test']['samples']} | 0.6100 |" in card
    assert "The run recorded no intervals for them; `ssit-dist predict --labels` gives" in card
    assert "(95% CI" not in card


def test_cls_avg_run_is_refused_for_timm_and_exports_as_files(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(GraderFileError) as caught:
        export_grader(runs["cls+avg"], tmp_path / "timm", layout="timm")
    assert "\n" not in str(caught.value)
    result = invoke_cli("export", runs["cls+avg"], "-o", tmp_path / "timm", "--format", "timm", check=False)
    message = " ".join(result.output.split())  # the console wraps at its width
    assert result.exit_code == 1 and message.startswith("error: ") and str(caught.value) in message
    assert "(pool cls+avg), and timm has no pooling that concatenates: fine-tune with pool=token or pool=avg" in message
    assert f"`ssit-dist predict --model {runs['cls+avg']}`" in message
    assert not (tmp_path / "timm").exists()
    invoke_cli("export", runs["cls+avg"], "-o", tmp_path / "grader")
    grader, info = open_grader(tmp_path / "grader.safetensors")
    run_grader, _ = open_grader(runs["cls+avg"])
    torch.testing.assert_close(logits(grader, fixed_input()), logits(run_grader, fixed_input()), rtol=0, atol=0)
    assert (info.pool, info.objective, info.thresholds, info.extra["checkpoint"]) == (
        "cls+avg",
        "classification",
        None,
        "best",
    )
    again = invoke_cli("export", runs["cls+avg"], "-o", tmp_path / "grader", check=False)
    assert again.exit_code == 1 and "grader.safetensors exists; pass --overwrite" in " ".join(again.output.split())
    absent = invoke_cli("export", runs["token"], "-o", tmp_path / "f", "--tag", "final", check=False)
    assert absent.exit_code == 1
    assert "has no final.safetensors (it has best.safetensors): choose best" in " ".join(absent.output.split())
