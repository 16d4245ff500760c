"""bench/perf/scaling.py's model: its formulas at the sizes where they can be worked out by hand, the
properties any sound scaling model has (one GPU is 100% efficient; efficiency only falls with more GPUs at
a fixed per-GPU batch; overlap never hurts; latency-bound collectives grow with the GPU count while
bandwidth-bound ones stay flat), and its counts of the traffic the code makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.perf.scaling import (
    ARCHS,
    Fabric,
    ModelCounts,
    Step,
    Traffic,
    check_counted,
    collective_time,
    loss_traffic,
    measured_traffic,
    model_counts,
    read_collectives,
    ring,
)

POWERS_OF_TWO = [2**i for i in range(11)]  # 1 to 1,024 GPUs: whole nodes of 8 from 8 on


@pytest.fixture(scope="module")
def vit_s() -> ModelCounts:
    return model_counts(ARCHS["vit_s"], 224)


def recipe_step(counts: ModelCounts, gradients: float = 86.4e6) -> Step:
    """ViT-S's ZeRO-2 step at the target rate: 64 pairs in 21.3 ms, bf16 gradients, weights and EMA."""
    traffic = {
        "gradients": Traffic("all_reduce", gradients, 3),
        "parameters": Traffic("all_gather", 86.4e6, 1),
        "ema": Traffic("all_gather", 82.0e6, 1),
        "batchnorm": counts.batchnorm,
        "loss_gathers": loss_traffic(counts, 64),
    }
    return Step(64 / 3000, traffic)


def test_ring_of_two_ranks_is_the_formula_worked_by_hand() -> None:
    fabric = Fabric(nvlink_gb_s=100.0, nvlink_us=3.0, call_us=0.0)
    size = 1e8
    all_reduce = ring(Traffic("all_reduce", size, 1), 2, fabric)
    # 2 (N-1)/N = 1: the payload once over the link, and two steps (reduce-scatter, all-gather).
    assert all_reduce.bandwidth == pytest.approx(size / 100e9)
    assert all_reduce.latency == pytest.approx(2 * 3e-6)
    all_gather = ring(Traffic("all_gather", size, 1), 2, fabric)
    assert all_gather.bandwidth == pytest.approx(size / 2 / 100e9)
    assert all_gather.latency == pytest.approx(3e-6)
    assert ring(Traffic("all_reduce", size, 1), 1, fabric).total == 0.0


@pytest.mark.parametrize("ib", [200.0, 400.0])
def test_efficiency_is_one_on_one_gpu_and_never_rises_with_more(vit_s: ModelCounts, ib: float) -> None:
    step, fabric = recipe_step(vit_s), Fabric(ib_gbit_s=ib)
    for overlap in (False, True):
        efficiency = [step.efficiency(n, fabric, overlap) for n in POWERS_OF_TWO]
        assert efficiency[0] == 1.0
        assert all(b <= a for a, b in zip(efficiency, efficiency[1:], strict=False)), efficiency
        assert efficiency[-1] < 1.0


def test_overlap_is_never_worse_and_hides_at_most_the_backward(vit_s: ModelCounts) -> None:
    fabric = Fabric()
    for gradients in (1e6, 86.4e6, 20e9):  # hidden entirely ... far more than the backward
        step = recipe_step(vit_s, gradients)
        for n in POWERS_OF_TWO:
            with_overlap, without = step.time(n, fabric, True), step.time(n, fabric, False)
            assert with_overlap <= without
            assert without - with_overlap <= step.backward_share * step.compute_s + 1e-12
    flooded = recipe_step(vit_s, 20e9)  # 20 GB of gradients: the backward is too short to hide them
    saved = flooded.time(64, fabric, False) - flooded.time(64, fabric, True)
    assert saved == pytest.approx(flooded.backward_share * flooded.compute_s)


def test_latency_bound_grows_with_gpus_bandwidth_bound_stays_flat_under_ring() -> None:
    fabric = Fabric(call_us=0.0)
    small = [ring(Traffic("all_reduce", 2048, 1), n, fabric).total for n in (16, 1024)]
    assert small[1] > 50 * small[0]  # 2 (N-1) steps: 30 -> 2,046
    large = Fabric(nvlink_us=0.0, ib_us=0.0, call_us=0.0)
    flat = [ring(Traffic("all_reduce", 1e9, 1), n, large).total for n in (16, 64, 256, 1024)]
    # Only 2 (N-1)/N moves: 1.875 at 16 GPUs, 1.998 at 1,024.
    assert max(flat) / min(flat) == pytest.approx((2 * 1023 / 1024) / (2 * 15 / 16))


def test_the_tree_beats_the_ring_for_small_all_reduces_across_many_nodes() -> None:
    fabric, small = Fabric(), Traffic("all_reduce", 32772, 1)
    best = collective_time(small, 1024, fabric)
    assert best.algorithm == "hierarchical_tree"
    assert best.total < collective_time(small, 1024, fabric, ring_only=True).total / 10


def test_batchnorm_traffic_is_counted_from_the_model(vit_s: ModelCounts) -> None:
    # Projector: 2 hidden BatchNorms (4,096) and 1 output (256); predictor: 1 hidden and 1 output. Per view:
    # online heads forward and backward (5 x 2), momentum projector forward (3): 26 per micro batch.
    assert vit_s.batchnorm.calls == 26
    # Each carries sums, sums of squares and the count in fp32: 16 of 4,096 features, 10 of 256.
    assert vit_s.batchnorm.payload == 16 * 4 * (2 * 4096 + 1) + 10 * 4 * (2 * 256 + 1)
    vit_b = model_counts(ARCHS["vit_b"], 224)
    assert vit_b.batchnorm == vit_s.batchnorm  # the heads are the same for every encoder
    assert vit_b.online > 2.5 * vit_s.online


def test_loss_gathers_grow_with_the_gpu_count(vit_s: ModelCounts) -> None:
    keys = loss_traffic(vit_s, 64)
    assert keys.payload_at(8) == 2 * 8 * 64 * 256 * 4  # two gathers of 64 fp32 keys of 256 from each GPU
    assert keys.payload_at(1024) == 128 * keys.payload_at(8)


def test_measured_bytes_become_one_payload_whatever_the_world() -> None:
    # collectives.py's ZeRO-2 counts at world 2 and 4 (sent bytes: ring shares of the payload).
    runs = [
        {"world": 2, "zero_stage": 2, "sent_bytes_per_rank_per_step": {"gradients": 86430981, "ema": 43215488}},
        {"world": 4, "zero_stage": 2, "sent_bytes_per_rank_per_step": {"gradients": 129646471, "ema": 64823232}},
    ]
    scale = {"gradients": 1.0, "parameters": 1.0, "ema": 1.0}
    two, four = (measured_traffic(run, scale) for run in runs)
    assert two["gradients"].payload == pytest.approx(four["gradients"].payload, rel=1e-6)
    assert two["ema"].payload == pytest.approx(2 * 43215488)  # an all-gather sends (W-1)/W of the whole
    assert two["gradients"].op == "all_reduce" and two["ema"].op == "all_gather"


def test_counts_that_disagree_with_the_measurement_are_refused() -> None:
    counts = model_counts("vit_small_patch16_224", 64)
    sent = {"batchnorm": 544872, "loss_gathers": 4096}  # collectives.py's counts at world 2
    run = {"world": 2, "zero_stage": 2, "sent_bytes_per_rank_per_step": sent}
    assert check_counted(run, counts)["batchnorm"]["counted_payload"] == 544872
    sent["batchnorm"] = 2 * 544872  # a BatchNorm layer the count misses
    with pytest.raises(SystemExit, match="batchnorm"):
        check_counted(run, counts)
    sent["batchnorm"], run["online_parameters"] = 544872, 2 * counts.online  # another model was measured
    with pytest.raises(SystemExit, match="online_parameters"):
        check_counted(run, counts)


def test_collectives_output_is_read_past_log_lines(tmp_path: Path) -> None:
    # DeepSpeed logs to stdout, so a saved run of collectives.py starts with its lines.
    doc = {"cpu": "x", "runs": [{"world": 2, "zero_stage": 1}]}
    saved = tmp_path / "collectives.json"
    saved.write_text("[2026-12-06] [WARNING] accelerator {cpu}\nDeepSpeed op built\n" + json.dumps(doc, indent=2))
    assert read_collectives(saved, [])[0] == doc
    saved.write_text("no json here\n")
    with pytest.raises(SystemExit, match="collectives.py"):
        read_collectives(saved, [])
