"""Communication time per optimizer step and scaling efficiency at 8 to 1,024 GPUs, predicted; prints JSON.

No machine here has more than one GPU, so the scale is planned on paper, from three inputs:

- traffic: what bench/perf/collectives.py counts per collective kind per optimizer step (gradients,
  parameters, EMA, BatchNorm, loss gathers) on real DeepSpeed engines of SSiT ViT-S/16 (64 px views,
  2 samples per rank), read from its JSON (`--collectives FILE`, its stdout saved; `make bench` does so)
  or, without that flag, by running it (world 2, ZeRO 1-3: a few minutes on 2 cores); calls per kind
  from the run where it records them, else MEASURED_CALLS. Gradients and parameters scale
  to other encoders by the online network's parameter count, the EMA by the mirrored one's (encoder +
  projector): ViT-B is ViT-S's counts scaled so, not run (the counter runs a whole DeepSpeed step per
  stage; ViT-B's would take several times as long here and move the same collectives, 12 blocks each).
  BatchNorm and the loss gathers are counted from the model (`batchnorm_traffic`, `loss_traffic`) and
  checked against the measured bytes; they do not depend on the encoder.
- compute: a stated GPU rate (the project's targets: 3,000 pairs/s for ViT-S/16, 1,500 for ViT-B/16 per
  H100 at 64 pairs per GPU), one micro batch per optimizer step, as the recipes run on 8 GPUs.
- links: stated bandwidths and latencies (`Fabric`), each with its source; every one is a flag.

Collective times (S: payload bytes, the all-reduced tensor or the gathered / scattered whole; N GPUs in
M nodes of g; k = 2 for an all-reduce (a reduce-scatter then an all-gather), 1 for an all-gather or
reduce-scatter; a: latency of one step; B: bandwidth per GPU per direction; c: a call's fixed cost):

- ring, one ring through every GPU (NCCL's ring; across nodes one ring per NIC rail):
  k (N-1)/N S / B_ring + calls (c + k ((N-M) a_nvlink + (M-1) a_ib)), with B_ring = B_nvlink in one
  node and min(B_nvlink, g B_ib) across nodes; the latency is NCCL's own cost model's
  (src/graph/tuning.cc: every step pays the network latency only where it crosses nodes).
- hierarchical (2-D): within each node over NVLink, k (g-1)/g S / B_nvlink + k (g-1) a_nvlink; across
  nodes among the GPUs of one local rank, each on its own NIC with S/g: ring k (M-1)/M (S/g) / B_ib +
  k (M-1) a_ib, or for an all-reduce a pipelined binary tree 2 (S/g) / B_ib + 2 ceil(log2 M) a_ib;
  plus c per call.
- each collective takes the fastest of these (NCCL's tuner picks per call as well); `ring_only` is the
  same step with every collective on the flat ring (NCCL_ALGO=Ring).

A step without overlap takes compute + every collective. With overlap, the gradient reduction runs
under the backward pass (2/3 of compute by default) and only what exceeds it is exposed; the EMA
gather (before the keys), the BatchNorm all-reduces (inside forward and backward), the loss gathers
and the parameter all-gathers stay on the critical path. Efficiency: compute over step time (1 on one
GPU), at a fixed per-GPU batch (weak scaling: the global batch grows with N).

Usage: python bench/perf/scaling.py [--collectives FILE] [--out FILE] [--gpus 8 64 256 1024]
  [--ib-gbit-s 200 400] [--nvlink-gb-s 450] ... (--help lists every assumption)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.ssit import SSiT

COLLECTIVES = Path(__file__).with_name("collectives.py")
ARCHS = {"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}
# What collectives.py runs (PretrainConfig(global_batch=2 * world), img_size 64): the measured bytes are
# turned into bytes per parameter of this model, and its loss gathers are those of this micro batch.
MEASURED_ARCH, MEASURED_IMG, MEASURED_MICRO_BATCH = "vit_small_patch16_224", 64, 2
# Calls per optimizer step by kind, counted by collectives.py's wrapper (its per-rank `calls`; the same at
# world 2 and 4) on commit fdac1d7, 2026-12-06: its JSON does not carry them yet. A run's own
# `calls_per_rank_per_step` wins. BatchNorm and the loss gathers are counted from the model.
MEASURED_CALLS = {
    0: {"gradients": 2},
    1: {"gradients": 3, "parameters": 1, "ema": 1},
    2: {"gradients": 3, "parameters": 1, "ema": 1},
    3: {"gradients": 2, "parameters": 116, "ema": 1},  # 110 all-gathers and 6 broadcasts, per module
}
LOSS_GATHERS_PER_MICRO_BATCH = 2  # contrastive_loss(q1, k2) + contrastive_loss(q2, k1): one key gather each
OVERLAPPED = "gradients"
OPS = ("all_reduce", "all_gather", "reduce_scatter")


SOURCES = {
    "nvlink_gb_s": "H100 SXM NVLink 4: 18 links, 900 GB/s both directions per GPU (NVIDIA datasheet); NCCL's "
    "measured bus bandwidth on 8 H100s is below this link rate",
    "ib_gbit_s": "one NDR (400 Gb/s) or HDR (200 Gb/s) InfiniBand port per GPU, one rail each (DGX H100: 8 x "
    "400 Gb/s ConnectX-7)",
    "nvlink_us": "per ring step / tree level; NCCL's cost model (src/graph/tuning.cc, hwLat): 0.5-3.4 us over "
    "NVLink (ring, LL to Simple protocol)",
    "ib_us": "per ring step / tree level; NCCL's cost model: 2.7-9.6 us over the network (ring), 5 us per tree "
    "level (LL, the protocol of small messages)",
    "call_us": "fixed cost of one collective (launch, set-up): NCCL's baseLat, 3.6-8.4 us (ring)",
    "rates": "the project's targets per H100 (issue 34), not measured: no GPU here",
    "backward_share": "backward about twice the forward FLOPs of the trainable side; the momentum network's "
    "forward (no backward) makes the true share a little lower",
}


@dataclass(frozen=True)
class Fabric:
    """The links, as stated assumptions: bandwidths per GPU per direction, latencies per ring step or tree
    level, and a fixed cost per call (SOURCES says where each number comes from)."""

    gpus_per_node: int = 8
    nvlink_gb_s: float = 450.0
    ib_gbit_s: float = 400.0
    nvlink_us: float = 1.0
    ib_us: float = 5.0
    call_us: float = 4.0

    @property
    def nvlink(self) -> float:  # bytes/s
        return self.nvlink_gb_s * 1e9

    @property
    def ib(self) -> float:  # bytes/s
        return self.ib_gbit_s * 1e9 / 8


@dataclass(frozen=True)
class Traffic:
    """One collective kind's traffic per optimizer step: `payload` bytes over `calls` calls of `op`; for a
    gather of every rank's piece (`per_rank`), the bytes of one rank's piece, so the whole grows with N."""

    op: str
    payload: float
    calls: float
    per_rank: bool = False
    group: int = 0  # the collective spans at most this many GPUs (0: all of them)

    def payload_at(self, gpus: int) -> float:
        return self.payload * gpus if self.per_rank else self.payload


@dataclass(frozen=True)
class Time:
    """A collective's predicted seconds per step, split into what latency and what bandwidth costs."""

    latency: float
    bandwidth: float
    algorithm: str

    @property
    def total(self) -> float:
        return self.latency + self.bandwidth


def _steps(op: str) -> int:
    if op not in OPS:
        raise ValueError(f"collective op {op!r}: the model knows {', '.join(OPS)}")
    return 2 if op == "all_reduce" else 1


def ring(traffic: Traffic, gpus: int, fabric: Fabric) -> Time:
    """One ring through all `gpus` (module docstring, "ring")."""
    if gpus == 1:
        return Time(0.0, 0.0, "none")
    k, nodes = _steps(traffic.op), math.ceil(gpus / fabric.gpus_per_node)
    bandwidth = fabric.nvlink if nodes == 1 else min(fabric.nvlink, fabric.gpus_per_node * fabric.ib)
    step_latency = k * ((gpus - nodes) * fabric.nvlink_us + (nodes - 1) * fabric.ib_us)
    latency = traffic.calls * (fabric.call_us + step_latency) * 1e-6
    return Time(latency, k * (gpus - 1) / gpus * traffic.payload_at(gpus) / bandwidth, "ring")


def hierarchical(traffic: Traffic, gpus: int, fabric: Fabric, tree: bool) -> Time:
    """Within the node over NVLink, across nodes over each GPU's own NIC with 1/g of the payload, as a
    ring or (all-reduce only) a tree (module docstring, "hierarchical")."""
    k, g = _steps(traffic.op), fabric.gpus_per_node
    nodes, size = math.ceil(gpus / g), traffic.payload_at(gpus)
    if nodes == 1 or gpus % g:
        raise ValueError(f"hierarchical collectives need whole nodes of {g} GPUs, got {gpus}")
    if tree and traffic.op != "all_reduce":
        raise ValueError(f"a tree runs all-reduces only, not {traffic.op}")
    intra_latency, intra_bandwidth = k * (g - 1) * fabric.nvlink_us, k * (g - 1) / g * size / fabric.nvlink
    if tree:
        inter_latency, inter_bandwidth = 2 * math.ceil(math.log2(nodes)) * fabric.ib_us, 2 * size / g / fabric.ib
    else:
        inter_latency, inter_bandwidth = k * (nodes - 1) * fabric.ib_us, k * (nodes - 1) / nodes * size / g / fabric.ib
    latency = traffic.calls * (fabric.call_us + intra_latency + inter_latency) * 1e-6
    return Time(latency, intra_bandwidth + inter_bandwidth, "hierarchical_tree" if tree else "hierarchical_ring")


def collective_time(traffic: Traffic, gpus: int, fabric: Fabric, ring_only: bool = False) -> Time:
    """The fastest algorithm for this traffic at `gpus` (the flat ring alone where `ring_only`)."""
    gpus = min(gpus, traffic.group or gpus)
    candidates = [ring(traffic, gpus, fabric)]
    if not ring_only and gpus > fabric.gpus_per_node and gpus % fabric.gpus_per_node == 0:
        candidates.append(hierarchical(traffic, gpus, fabric, tree=False))
        if traffic.op == "all_reduce":
            candidates.append(hierarchical(traffic, gpus, fabric, tree=True))
    return min(candidates, key=lambda t: t.total)


@dataclass(frozen=True)
class Step:
    """One optimizer step of one GPU: its compute time and what it moves."""

    compute_s: float
    traffic: dict[str, Traffic]
    backward_share: float = 2 / 3  # of compute: where the gradient reduction can hide

    def time(self, gpus: int, fabric: Fabric, overlap: bool) -> float:
        """Seconds per step at `gpus`: compute plus the collectives (less the hidden gradient reduction)."""
        times = {kind: collective_time(t, gpus, fabric).total for kind, t in self.traffic.items()}
        hidden = min(times.get(OVERLAPPED, 0.0), self.backward_share * self.compute_s) if overlap else 0.0
        return self.compute_s + sum(times.values()) - hidden

    def efficiency(self, gpus: int, fabric: Fabric, overlap: bool) -> float:
        """Per-GPU throughput at `gpus` over one GPU's (which moves nothing)."""
        return self.compute_s / self.time(gpus, fabric, overlap)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def predict(step: Step, gpus: int, fabric: Fabric) -> dict:
    """The JSON of one GPU count: each kind's time, latency share and algorithm; totals; efficiencies."""
    times = {kind: collective_time(t, gpus, fabric) for kind, t in step.traffic.items()}
    ring_only = sum(collective_time(t, gpus, fabric, ring_only=True).total for t in step.traffic.values())
    return {
        "gpus": gpus,
        "comm_ms": {kind: _ms(t.total) for kind, t in times.items()},
        "latency_share": {kind: round(t.latency / t.total, 3) if t.total else 0.0 for kind, t in times.items()},
        "algorithm": {kind: t.algorithm for kind, t in times.items()},
        "comm_ms_total": _ms(sum(t.total for t in times.values())),
        "comm_ms_total_ring_only": _ms(ring_only),
        "step_ms": {
            "no_overlap": _ms(step.time(gpus, fabric, False)),
            "overlap": _ms(step.time(gpus, fabric, True)),
        },
        "efficiency": {
            "no_overlap": round(step.efficiency(gpus, fabric, False), 4),
            "overlap": round(step.efficiency(gpus, fabric, True), 4),
        },
    }


@dataclass(frozen=True)
class ModelCounts:
    """What the traffic of one SSiT configuration scales with, counted from the model itself."""

    online: int  # parameters DeepSpeed reduces and gathers
    mirrored: int  # parameters the momentum network follows (encoder + projector)
    batchnorm: Traffic  # per micro batch
    key_bytes: int  # one sample's key in the contrastive loss's gather


def batchnorm_traffic(model: SSiT) -> Traffic:
    """The cross-rank BatchNorm all-reduces of one micro batch. Each BatchNorm1d all-reduces its
    per-feature sums, sums of squares and the count, 2F + 1 fp32 (models/batchnorm.py), once per view
    through it: the online projector and predictor in forward and again in backward (dist._SumOverRanks),
    the momentum projector in forward only. Both views take the heads one after the other."""

    def sizes(module: nn.Module) -> list[int]:
        return [4 * (2 * m.num_features + 1) for m in module.modules() if isinstance(m, nn.BatchNorm1d)]

    online = sizes(model.online.projector) + sizes(model.online.predictor)
    momentum = sizes(model.momentum.projector)
    views = 2
    return Traffic(
        "all_reduce",
        payload=views * (2 * sum(online) + sum(momentum)),
        calls=views * (2 * len(online) + len(momentum)),
    )


def model_counts(arch: str, img_size: int) -> ModelCounts:
    """Counts of an SSiT model built on the meta device (no memory, no weights)."""
    cfg = ModelConfig(arch=arch, img_size=img_size)
    with torch.device("meta"):
        model = SSiT(cfg)
    mirrored = sum(p.numel() for module in model.online.ema_source() for p in module.parameters())
    return ModelCounts(
        online=sum(p.numel() for p in model.online.parameters()),
        mirrored=mirrored,
        batchnorm=batchnorm_traffic(model),
        key_bytes=4 * cfg.proj_dim,  # keys are gathered normalised, in fp32 (models/losses.py)
    )


def loss_traffic(counts: ModelCounts, micro_batch: int) -> Traffic:
    """The contrastive loss's key gathers of one micro batch: every rank's keys, so the whole grows with N."""
    calls = LOSS_GATHERS_PER_MICRO_BATCH
    return Traffic("all_gather", calls * micro_batch * counts.key_bytes, calls, per_rank=True)


def _op(kind: str, stage: int) -> str:
    """The collective DeepSpeed or ssit_dist runs for a kind (the ops collectives.py's wrapper saw)."""
    if kind == "gradients":
        return "reduce_scatter" if stage == 3 else "all_reduce"
    if kind in ("parameters", "ema", "loss_gathers"):
        return "all_gather"
    if kind == "batchnorm":
        return "all_reduce"
    raise ValueError(f"collectives JSON: kind {kind!r} is not modelled in bench/perf/scaling.py; add it to _op")


def _share(kind: str, stage: int, world: int) -> float:
    """The share of the payload one rank sends in a ring at `world` (collectives.py counts sent bytes)."""
    return _steps(_op(kind, stage)) * (world - 1) / world


def measured_traffic(run: dict, scale: dict[str, float]) -> dict[str, Traffic]:
    """Gradients, parameters and EMA of one collectives.py run as payloads, times `scale` (another
    model's parameters over the measured one's)."""
    world, stage, sent = run["world"], run["zero_stage"], run["sent_bytes_per_rank_per_step"]
    calls = run.get("calls_per_rank_per_step") or MEASURED_CALLS[stage]
    out = {}
    for kind in ("gradients", "parameters", "ema"):
        if sent.get(kind):
            payload = sent[kind] / _share(kind, stage, world) * scale[kind]
            out[kind] = Traffic(_op(kind, stage), payload, calls[kind])
    return out


def check_counted(run: dict, counts: ModelCounts) -> dict:
    """BatchNorm and loss-gather bytes counted from the model against those collectives.py measured at
    its world size; a mismatch means this file's counting no longer matches the code."""
    world, stage, sent = run["world"], run["zero_stage"], run["sent_bytes_per_rank_per_step"]
    # The model the bytes per parameter come from (collectives.py once counted ZeRO-3's partition only).
    if (stage < 3 or "mirrored_parameters" in run) and run.get("online_parameters", counts.online) != counts.online:
        raise SystemExit(
            f"collectives JSON, world {world}, ZeRO-{stage}: online_parameters {run['online_parameters']}, but "
            f"{MEASURED_ARCH} at {MEASURED_IMG} px has {counts.online}: set MEASURED_* in bench/perf/scaling.py "
            "to the model collectives.py runs"
        )
    counted = {
        "batchnorm": counts.batchnorm.payload,
        "loss_gathers": loss_traffic(counts, MEASURED_MICRO_BATCH).payload_at(world),
    }
    checks = {}
    for kind, expected in counted.items():
        measured = sent.get(kind, 0) / _share(kind, stage, world)
        checks[kind] = {"measured_payload": round(measured), "counted_payload": round(expected)}
        if abs(measured - expected) > 0.01 * expected:
            raise SystemExit(
                f"collectives JSON, world {world}, ZeRO-{stage}: {kind} moves {measured:.0f} payload bytes per step, "
                f"bench/perf/scaling.py counts {expected:.0f} from the model: update batchnorm_traffic / loss_traffic "
                "(or MEASURED_* if collectives.py now measures another model or batch)"
            )
    return checks


def extrapolation_checks(runs: list[dict]) -> list[dict]:
    """The model's rule for bytes at another world size (ring shares; loss gathers grow with the world),
    tried on collectives.py's own runs: each stage's smallest world predicts its largest."""
    out = []
    for stage in sorted({r["zero_stage"] for r in runs}):
        same = sorted((r for r in runs if r["zero_stage"] == stage), key=lambda r: r["world"])
        low, high = same[0], same[-1]
        if low["world"] == high["world"]:
            continue
        for kind, sent in sorted(low["sent_bytes_per_rank_per_step"].items()):
            lw, hw = low["world"], high["world"]
            predicted = (
                sent / _share(kind, stage, lw) * _share(kind, stage, hw) * (hw / lw if kind == "loss_gathers" else 1)
            )
            measured = high["sent_bytes_per_rank_per_step"].get(kind, 0)
            out.append(
                {
                    "zero_stage": stage,
                    "kind": kind,
                    "from_world": lw,
                    "to_world": hw,
                    "measured": measured,
                    "predicted": round(predicted),
                    "ratio": round(measured / predicted, 4) if predicted else None,
                }
            )
    return out


REMEDIES = {
    "batchnorm": (
        "BatchNorm's all-reduces are small (2-33 KB) and latency-bound: each pays a whole collective's latency "
        "across every GPU, and the bytes do not shrink. (1) Fuse what does not depend on each other: both views "
        "take the projector and predictor one after the other, so one all-reduce per layer can carry both "
        "views' statistics (26 -> 13 per micro batch; 10 if the momentum projector ran beside the online one). "
        "One all-reduce per projector forward is impossible with global statistics: each layer's statistics "
        "need the previous layer's normalised output. (2) Statistics over a group of ranks, e.g. the 8 GPUs "
        "of a node (NVLink latency only, 512 samples per statistic): a change of method to validate for "
        "quality (MoCo v3 synchronises BatchNorm over all GPUs). (3) Leave NCCL free to use its tree "
        "(NCCL_ALGO unset): 2 log2(nodes) network steps instead of 2 (nodes - 1) (see comm_ms_total_ring_only)."
    ),
    "parameters": (
        "All-gathers have no tree in NCCL: their latency grows with the node count. ZeRO-3 gathers per module "
        "(about 116 calls per step; the model puts them one after the other, where DeepSpeed prefetches some "
        "beside compute, so it is an upper bound), far past the compute: ViT-S/B and their heads fit every GPU, so use "
        "ZeRO-1/2, or ZeRO++'s hierarchical partitioning (zero_hpz_partition_size: 8, a copy of the weights per "
        "node, so the forward's gathers stay on NVLink). Under ZeRO-1/2 it is one all-gather of the updated "
        "weights per step; ZeRO-0 needs none (its gradient all-reduce can run as a tree: see the stage-0 rows)."
    ),
    "ema": (
        "The momentum update's all-gather, on the critical path before the keys: gather only what the "
        "momentum network mirrors, in the compute dtype (issue 34, section 3), and it could be issued at the "
        "end of the previous step, beside the data wait. ZeRO-0 needs no gather (every rank holds the fp32 "
        "weights)."
    ),
    "loss_gathers": (
        "The contrastive loss gathers every GPU's keys, so its bytes grow with the global batch (64 x N "
        "pairs at a fixed per-GPU batch: 65,536 at 1,024 GPUs, past the batches MoCo v3 was tuned at). "
        "Gather the keys in bf16 (half the bytes), or keep the global batch and shrink the per-GPU one."
    ),
    "gradients": (
        "Overlap the reduction with the backward pass: DeepSpeed's overlap_comm (off by default under ZeRO 1/2) "
        "with a reduce_bucket_size below the gradient size (default 5e8 elements: one bucket, reduced after "
        "the backward); the shipped configs set neither, so 'no_overlap' is today's figure."
    ),
}


def bottleneck_notes(scenarios: list[dict], threshold: float = 0.02) -> list[str]:
    """The kinds that stop scaling: at the largest GPU count at least `threshold` of the compute time and
    latency-bound (latency share >= 0.5) or of growing bytes (the loss gathers); for each, its worst
    case, how it grew from the smallest GPU count, and the remedy."""
    worst: dict[str, tuple[float, str]] = {}
    for s in scenarios:
        first, last = s["predictions"][0], s["predictions"][-1]
        for kind, ms in last["comm_ms"].items():
            share, latency = ms / s["compute_ms"], last["latency_share"][kind]
            if share < threshold or not (latency >= 0.5 or kind == "loss_gathers"):
                continue
            if share > worst.get(kind, (0.0, ""))[0]:
                where = f"{s['arch']}, ZeRO-{s['zero_stage']}, {s['ib_gbit_s']:g} Gb/s"
                worst[kind] = (
                    share,
                    f"{kind}: {first['comm_ms'][kind]:.2f} ms per step at {first['gpus']} GPUs, {ms:.2f} ms at "
                    f"{last['gpus']} ({share:.0%} of the compute time, {latency:.0%} of it latency; worst case "
                    f"{where}). {REMEDIES[kind]}",
                )
    return [text for _, text in sorted(worst.values(), reverse=True)]


def batchnorm_remedies(step: Step, gpus: list[int], fabric: Fabric) -> dict:
    """Efficiency (no overlap) and BatchNorm ms per step with BatchNorm as it is, with both views'
    statistics in one all-reduce per layer, and with statistics over each node's GPUs only."""
    bn = step.traffic["batchnorm"]
    variants = {
        "as_is": bn,
        "views_fused": replace(bn, calls=bn.calls / 2),
        "node_local_statistics": replace(bn, group=fabric.gpus_per_node),
    }
    out = {}
    for name, traffic in variants.items():
        variant = replace(step, traffic=step.traffic | {"batchnorm": traffic})
        out[name] = [
            {
                "gpus": n,
                "batchnorm_ms": _ms(collective_time(traffic, n, fabric).total),
                "efficiency": round(variant.efficiency(n, fabric, False), 4),
            }
            for n in gpus
        ]
    return out


LEGEND = {
    "payload_mb": "bytes per optimizer step over all calls of each kind, at the smallest GPU count (the loss "
    "gathers' whole grows with the count)",
    "comm_ms": "each kind's predicted time per step, by its fastest algorithm (`algorithm`)",
    "latency_share": "the part of comm_ms that latency costs (the rest: bandwidth)",
    "comm_ms_total_ring_only": "the same step with every collective on one flat ring (NCCL_ALGO=Ring)",
    "step_ms, efficiency": "no_overlap: compute + every collective; overlap: the gradient reduction hidden under "
    "the backward up to its length. Efficiency: compute / step time (1 on one GPU)",
    "checks": "counted_vs_measured: BatchNorm and loss-gather payloads counted from the model against "
    "collectives.py's; extrapolation: each stage's smallest world's counts as payloads, priced again at its "
    "largest world, against that world's counts, i.e. the payloads the code hands to the collectives do not "
    "change with the world size (the ring shares themselves are collectives.py's accounting, not a wire "
    "measurement)",
    "batchnorm_remedies": "ZeRO-2 efficiency (no overlap) with BatchNorm as it is, both views' statistics in one "
    "all-reduce per layer, and statistics over each node's 8 GPUs only",
}


def read_collectives(path: Path | None, stages: list[int]) -> tuple[dict, str]:
    """collectives.py's JSON from `path` (its stdout saved: log lines before the JSON are skipped), or
    from running it at world 2 on `stages`."""
    if path is None:
        command = [sys.executable, str(COLLECTIVES), "--worlds", "2", "--stages", *map(str, stages), "--steps", "1"]
        source = " ".join(command[1:])
        text = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    else:
        text, source = path.read_text(), str(path)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                doc = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            if "runs" in doc:
                return doc, source
    raise SystemExit(f"{source}: no JSON object with 'runs' (the output of bench/perf/collectives.py) found")


def scenarios(runs: list[dict], args: argparse.Namespace, fabric: Fabric) -> tuple[list[dict], dict]:
    """For each encoder, ZeRO stage and InfiniBand speed: traffic, compute and predictions at every GPU
    count; and the BatchNorm remedies for ZeRO-2 (the recipes' stage)."""
    measured = model_counts(MEASURED_ARCH, MEASURED_IMG)
    out, remedies = [], {}
    for name, arch in ARCHS.items():
        counts = model_counts(arch, args.img_size)
        scale = {"gradients": counts.online / measured.online, "parameters": counts.online / measured.online}
        scale["ema"] = counts.mirrored / measured.mirrored
        rate = args.rate_vit_s if name == "vit_s" else args.rate_vit_b
        for run in runs:
            traffic = measured_traffic(run, scale)
            traffic |= {"batchnorm": counts.batchnorm, "loss_gathers": loss_traffic(counts, args.micro_batch)}
            step = Step(args.micro_batch / rate, traffic, args.backward_share)
            for ib in args.ib_gbit_s:
                links = replace(fabric, ib_gbit_s=ib)
                out.append(
                    {
                        "arch": name,
                        "zero_stage": run["zero_stage"],
                        "ds_config": run.get("ds_config"),
                        "ib_gbit_s": ib,
                        "compute_ms": _ms(step.compute_s),
                        "payload_mb": {k: round(t.payload_at(args.gpus[0]) / 1e6, 3) for k, t in traffic.items()},
                        "calls": {k: t.calls for k, t in traffic.items()},
                        "predictions": [predict(step, n, links) for n in args.gpus],
                    }
                )
                if run["zero_stage"] == 2:
                    remedies[f"{name}, ZeRO-2, {ib:g} Gb/s"] = batchnorm_remedies(step, args.gpus, links)
    return out, remedies


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collectives", type=Path, help="collectives.py's JSON (default: run it, ~3 min)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="ZeRO stages to run it on")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--gpus-per-node", type=int, default=Fabric.gpus_per_node)
    parser.add_argument("--nvlink-gb-s", type=float, default=Fabric.nvlink_gb_s, help=SOURCES["nvlink_gb_s"])
    parser.add_argument("--ib-gbit-s", type=float, nargs="+", default=[200.0, 400.0], help=SOURCES["ib_gbit_s"])
    parser.add_argument("--nvlink-us", type=float, default=Fabric.nvlink_us, help=SOURCES["nvlink_us"])
    parser.add_argument("--ib-us", type=float, default=Fabric.ib_us, help=SOURCES["ib_us"])
    parser.add_argument("--call-us", type=float, default=Fabric.call_us, help=SOURCES["call_us"])
    parser.add_argument("--rate-vit-s", type=float, default=3000.0, help="pairs/s per GPU; " + SOURCES["rates"])
    parser.add_argument("--rate-vit-b", type=float, default=1500.0, help="pairs/s per GPU; " + SOURCES["rates"])
    parser.add_argument("--micro-batch", type=int, default=64, help="pairs per GPU, one micro batch per step")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--backward-share", type=float, default=2 / 3, help=SOURCES["backward_share"])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    args.gpus = sorted(args.gpus)
    fabric = Fabric(
        gpus_per_node=args.gpus_per_node,
        nvlink_gb_s=args.nvlink_gb_s,
        nvlink_us=args.nvlink_us,
        ib_us=args.ib_us,
        call_us=args.call_us,
    )  # ib_gbit_s: one scenario per --ib-gbit-s
    doc, source = read_collectives(args.collectives, args.stages)
    # Per stage the run at the largest world: the nearest to the GPU counts predicted.
    runs = [
        max((r for r in doc["runs"] if r["zero_stage"] == s), key=lambda r: r["world"])
        for s in sorted({r["zero_stage"] for r in doc["runs"]})
    ]
    measured = model_counts(MEASURED_ARCH, MEASURED_IMG)
    predicted, remedies = scenarios(runs, args, fabric)
    result = {
        "date": datetime.date.today().isoformat(),
        "inputs": {
            "collectives": source,
            "collectives_machine": doc.get("cpu"),
            "collectives_model": doc.get("model"),
            "runs_used": [{k: r[k] for k in ("zero_stage", "world", "sent_bytes_per_rank_per_step")} for r in runs],
            "calls": "the runs' calls_per_rank_per_step"
            if all("calls_per_rank_per_step" in r for r in runs)
            else "MEASURED_CALLS (collectives.py's counts at world 2 and 4, fdac1d7)",
            "vit_b": "ViT-S's measured gradients / parameters / EMA bytes scaled by parameter count; BatchNorm "
            "and loss gathers counted from the model",
        },
        "assumptions": {
            **{k: v for k, v in asdict(fabric).items() if k != "ib_gbit_s"},
            "ib_gbit_s": args.ib_gbit_s,
            "rates_pairs_per_s": {"vit_s": args.rate_vit_s, "vit_b": args.rate_vit_b},
            "micro_batch_per_gpu": args.micro_batch,
            "micro_batches_per_step": 1,
            "backward_share": round(args.backward_share, 4),
            "sources": SOURCES,
        },
        "formulas": "Collective times" + __doc__.split("Collective times", 1)[1].split("Usage:", 1)[0].rstrip(),
        "checks": {
            "counted_vs_measured": [{"zero_stage": r["zero_stage"], **check_counted(r, measured)} for r in runs],
            "extrapolation": extrapolation_checks(doc["runs"]),
        },
        "scenarios": predicted,
        "batchnorm_remedies": remedies,
        "notes": bottleneck_notes(predicted),
        "legend": LEGEND,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
