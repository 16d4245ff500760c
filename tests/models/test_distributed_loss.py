"""Cross-rank pieces with 2 real gloo processes: the contrastive loss and BatchNorm over the global batch."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import start_ranks
from ssit_dist.dist import free_port
from ssit_dist.models.batchnorm import CrossRankBatchNorm1d, convert_batchnorm
from ssit_dist.models.losses import contrastive_loss

N, C, T = 4, 16, 0.2  # per-rank batch, feature size, temperature


def features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * N, C, generator=g), torch.randn(2 * N, C, generator=g)


def upstream() -> torch.Tensor:
    """The gradient the BatchNorm test sends back into its output, one row per sample. It must vary over
    the batch: a gradient constant per channel has zero gradient through BatchNorm, leaving rounding noise."""
    return torch.randn(2 * N, 8, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, port: int, out: str) -> None:
    warnings.simplefilter("error", FutureWarning)  # no deprecated torch API in the cross-rank path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        q_all, k_all = features()
        q = q_all[rank * N : (rank + 1) * N].clone().requires_grad_(True)
        loss = contrastive_loss(q, k_all[rank * N : (rank + 1) * N], T)
        loss.backward()

        torch.manual_seed(5)
        bn = torch.nn.Sequential(torch.nn.Linear(C, 8), torch.nn.BatchNorm1d(8))
        bn = convert_batchnorm(bn)
        x = q_all[rank * N : (rank + 1) * N].clone().requires_grad_(True)
        y = bn(x)
        (y * upstream()[rank * N : (rank + 1) * N]).sum().backward()
        torch.save(
            {
                "loss": loss.detach(),
                "q_grad": q.grad,
                "bn_out": y.detach(),
                "bn_x_grad": x.grad,
                "bn_w_grad": bn[0].weight.grad,
                "running_mean": bn[1].running_mean,
                "is_cross_rank": isinstance(bn[1], CrossRankBatchNorm1d),
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path: Path) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    start_ranks(_worker, (free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # One process, whole batch.
    q_all, k_all = features()
    q = q_all.clone().requires_grad_(True)
    loss = contrastive_loss(q, k_all, T)
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    # Data-parallel training averages gradients over ranks: rank r's gradient / 2 is the 1-rank gradient.
    assert q.grad is not None
    torch.testing.assert_close(torch.cat([r["q_grad"] for r in ranks]) / 2, q.grad)
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank really saw its own half

    torch.manual_seed(5)
    bn = torch.nn.Sequential(torch.nn.Linear(C, 8), torch.nn.BatchNorm1d(8))
    x = q_all.clone().requires_grad_(True)
    hidden = bn[0](x)
    hidden.retain_grad()
    y = bn[1](hidden)
    (y * upstream()).sum().backward()
    assert all(r["is_cross_rank"] for r in ranks)
    torch.testing.assert_close(torch.cat([r["bn_out"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["bn_x_grad"] for r in ranks]), x.grad)
    # The Linear's weight gradient sums 2N terms dh_i x_i that BatchNorm's backward makes partly cancel: a
    # float32 sum of n terms is exact to n * eps * sum |terms| in any order (two ranks' halves, one thread or
    # several), and dh_i carries the rounding of BatchNorm's own sums over the 2N samples: twice that bound,
    # scaled to each entry's terms rather than one fixed tolerance (measured: at most 1.9 eps * sum |terms|).
    assert hidden.grad is not None and bn[0].weight.grad is not None
    terms = hidden.grad.abs().T @ x.detach().abs()
    bound = 2 * (2 * N) * torch.finfo(torch.float32).eps * terms
    difference = (ranks[0]["bn_w_grad"] + ranks[1]["bn_w_grad"] - bn[0].weight.grad).abs()
    assert (difference <= bound).all(), (difference - bound).max()
    torch.testing.assert_close(ranks[0]["running_mean"], bn[1].running_mean)


def test_batchnorm_on_one_process_matches_torch_and_takes_bf16_weights() -> None:
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm1d(C)
    torch.nn.init.normal_(reference.weight)
    torch.nn.init.normal_(reference.bias)
    converted = convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(C)))[0]
    converted.load_state_dict(reference.state_dict())
    x = features()[0] * 3 + 1
    for _ in range(2):  # training: batch statistics, running statistics updated
        torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.running_var, reference.running_var)
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x))  # evaluation: the running statistics

    # What DeepSpeed's bf16 engine makes of it: bf16 weights, fp32 running statistics, bf16 input from
    # autocast. torch's CPU kernel refuses that mix; ours computes in fp32 and rounds the output to
    # bf16 once (relative error at most 2^-8, inside bf16's default tolerance on any CPU).
    converted.train().weight.data, converted.bias.data = converted.weight.bfloat16(), converted.bias.bfloat16()
    reference.train().weight.data, reference.bias.data = converted.weight.float(), converted.bias.float()
    out = converted(x.bfloat16())
    assert out.dtype == torch.bfloat16 and converted.running_mean.dtype == torch.float32
    torch.testing.assert_close(out, reference(x.bfloat16().float()).bfloat16())


def near_constant_features() -> torch.Tensor:
    """(6, 3), three rows per rank: 999.9 in every row, whose fp32 E[x^2] - mean^2 is -0.125 (each rank's
    sums of three equal values round once in any order, so every CPU computes the same), a near-constant
    feature of large magnitude (spread 1e-3 at 1000: the cancellation leaves rounding noise of either
    sign), and an ordinary one."""
    g = torch.Generator().manual_seed(0)
    rows = 6
    return torch.stack(
        [torch.full((rows,), 999.9), 1000 + 1e-3 * torch.randn(rows, generator=g), torch.randn(rows, generator=g)], 1
    )


def _near_constant_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        bn = CrossRankBatchNorm1d(3)
        x = near_constant_features()[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
        y = bn(x)
        (y * torch.arange(1.0, 4.0)).sum().backward()
        torch.save({"out": y.detach(), "x_grad": x.grad, "running_var": bn.running_var}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_batchnorm_of_a_constant_feature_stays_finite_across_ranks(tmp_path: Path) -> None:
    x = near_constant_features()
    # What E[x^2] - mean^2 gives for the constant feature, summed as the two ranks sum it: below -eps,
    # so without the clamp rsqrt(var + eps) is NaN.
    halves = x[:3], x[3:]
    total, squares = sum(h.sum(0) for h in halves), sum((h * h).sum(0) for h in halves)
    assert isinstance(total, torch.Tensor) and isinstance(squares, torch.Tensor)
    assert (squares / 6 - (total / 6) ** 2)[0] < -1e-3

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    start_ranks(_near_constant_worker, (free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    out, x_grad = torch.cat([r["out"] for r in ranks]), torch.cat([r["x_grad"] for r in ranks])
    assert out.isfinite().all() and x_grad.isfinite().all(), (out, x_grad)
    assert all((r["running_var"] >= 0).all() for r in ranks)
    # A constant feature normalises to one value; the ordinary feature is as torch normalises it.
    assert (out[:, 0] == out[0, 0]).all()
    torch.testing.assert_close(out[:, 2], torch.nn.BatchNorm1d(3)(x)[:, 2])


def test_batchnorm_of_a_constant_feature_stays_finite_on_one_process() -> None:
    x = near_constant_features()[:3].clone().requires_grad_(True)
    assert ((x * x).sum(0) / 3 - (x.sum(0) / 3) ** 2)[0] < -1e-3  # the same cancellation on one rank
    bn = CrossRankBatchNorm1d(3)
    y = bn(x)
    y.sum().backward()
    assert y.isfinite().all() and x.grad is not None and x.grad.isfinite().all(), (y, x.grad)
    bn.eval()
    assert bn(x).isfinite().all()  # the running variance it tracked is no NaN either
