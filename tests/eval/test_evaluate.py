"""`ssit-dist evaluate` end to end on real graded photographs of patients with both eyes: frozen features of a
tiny encoder, patient-grouped cross-validation, intervals, floors and chance, in this process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported at collection: torch's first import runs ldconfig, a process)

from conftest import invoke_cli

NATURAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "fundus" / "graded_natural"
# A small model: the command's work is the protocol, not the encoder (random init, 32 px, 8 px patches).
TINY = 'timm_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}'
# Short grids and few resamples, for time: the properties below do not depend on them.
QUICK = ["resamples=50", "fractions=[1.0]", "ks=[10,5]", "l2=[1.0,0.01]", "img_size=32"]


@pytest.fixture(scope="module")
def natural_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Both eyes of the first 60 two-eyed patients of graded_natural/ at 32 px, packed with their grades and
    patients (linked, never copied), all in one split; and each photograph's patient by its shard key."""
    from ssit_dist.data.packing.inputs import discover, sample_key
    from ssit_dist.data.packing.options import ShardOptions
    from ssit_dist.data.packing.shard import pack

    if not (NATURAL / "labels.csv").is_file():
        pytest.skip(f"real graded photographs of both eyes not found at {NATURAL} (../shared is absent here)")
    with open(NATURAL / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    eyes: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        eyes.setdefault(row["patient"], []).append(row)
    chosen = [row for patient_rows in eyes.values() if len(patient_rows) == 2 for row in patient_rows][:120]
    src = tmp_path_factory.mktemp("natural_src")
    for row in chosen:
        (src / row["image"]).symlink_to(NATURAL / row["image"])
    with open(src / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    out = tmp_path_factory.mktemp("natural") / "natural32"
    inputs = discover(src, [src / "labels.csv"], "all=1", 0, "patient")
    pack(src, out, inputs, ShardOptions(size=32, shard_size=50, saliency="none"))
    return out, {sample_key(row["image"]): row["patient"] for row in chosen}


@pytest.fixture(scope="module")
def report(natural_shards: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder, _ = natural_shards
    out = tmp_path_factory.mktemp("evaluate")
    invoke_cli(
        "evaluate", "random", "--data", folder, TINY, *QUICK, f"save_features={out / 'f.npz'}", "-o", out / "r.json"
    )
    return json.loads((out / "r.json").read_text()) | {"features_file": str(out / "f.npz")}


def test_report_has_every_method_endpoint_interval_and_floor(report: dict) -> None:
    assert set(report["methods"]) == {"random", "colour_histogram", "thumbnail"}
    assert set(report["differences"]) == {"random - colour_histogram", "random - thumbnail"}
    assert report["encoders"]["random"]["kind"] == "random" and report["missing"] == []
    for method in report["methods"].values():
        assert set(method) == {"knn", "probe"}
        for entry in method.values():
            for endpoint in ("qwk", "referable_auc", "accuracy"):
                low, high = entry[endpoint]["ci95"]
                assert low <= entry[endpoint]["value"] <= high, entry
    chance = report["chance"]
    assert chance["qwk"]["value"] == 0.0 and chance["referable_auc"]["value"] == 0.5
    # The majority grade's share, as the photographs' grades give it, and nothing perfect.
    counts = report["protocol"]["grade_counts"]
    assert chance["accuracy"]["value"] == pytest.approx(max(counts) / sum(counts), abs=0.02)
    assert all(entry["qwk"]["value"] < 1 for method in report["methods"].values() for entry in method.values())


def test_patients_come_from_the_shards_and_stay_in_one_fold(
    report: dict, natural_shards: tuple[Path, dict[str, str]]
) -> None:
    """120 photographs, 60 patients: the patients were read from the shards; folds of whole patients have
    even sizes (every patient brings two photographs)."""
    protocol = report["protocol"]
    assert protocol["samples"] == 120 and protocol["patients"] == 60
    assert all(size % 2 == 0 for size in protocol["fold_sizes"]), protocol["fold_sizes"]


def test_saved_features_are_keyed_by_photograph(report: dict, natural_shards: tuple[Path, dict[str, str]]) -> None:
    from ssit_dist.eval.features_file import load_features

    keys, features = load_features(report["features_file"])
    assert {key.split("/", 1)[1] for key in keys} == set(natural_shards[1])
    assert features["random"].shape == (120, 32) and features["colour_histogram"].shape == (120, 24)


def test_bad_fields_and_folders_are_named() -> None:
    result = invoke_cli("evaluate", "random", "--data", "/nonexistent/shards", check=False)
    assert result.exit_code == 2 and "/nonexistent/shards" in result.output
    result = invoke_cli("evaluate", "random", "--data", "/nonexistent", "folds=1", check=False)
    assert result.exit_code == 2 and "folds" in result.output
