"""SSiT's two losses against the formulas written out in numpy, in one process (test_distributed_loss.py
runs the contrastive loss on two ranks, where the positives sit at rank * N in the gathered keys)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssit_dist.models.losses import contrastive_loss, saliency_loss


def info_nce(q: np.ndarray, k: np.ndarray, temperature: float) -> float:
    """MoCo v3's loss: cross-entropy of cosine similarities / T with key i the positive of query i,
    scaled by 2T (the paper's `ctr` times 2 * tau)."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(np.diag(log_softmax)) * 2 * temperature)


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_contrastive_loss_is_infonce_scaled_by_2t(temperature: float) -> None:
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    ours = contrastive_loss(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), temperature)
    assert ours.item() == pytest.approx(info_nce(q, k, temperature), rel=1e-5)  # fp32 against float64


def test_contrastive_loss_in_closed_form_and_scale_invariant() -> None:
    # Each query equal to its own key and orthogonal to the others: cosine 1 for the positive, 0 for the
    # N - 1 negatives, so the loss is 2T * log(1 + (N - 1) exp(-1/T)) exactly.
    n, t = 6, 0.2
    eye = torch.eye(n)
    expected = 2 * t * math.log(1 + (n - 1) * math.exp(-1 / t))
    assert contrastive_loss(eye, eye, t).item() == pytest.approx(expected, rel=1e-6)
    q, k = torch.randn(n, 4), torch.randn(n, 4)
    scaled = contrastive_loss(3.0 * q, 0.5 * k, t)  # cosine similarity: lengths do not matter
    torch.testing.assert_close(scaled, contrastive_loss(q, k, t))


def test_contrastive_loss_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    q.requires_grad_(True)
    contrastive_loss(q, k, 0.5).backward()
    assert q.grad is not None
    step = 1e-3
    for i, j in [(0, 0), (2, 1), (4, 2)]:
        bumped = q.detach().clone()
        bumped[i, j] += step
        lowered = q.detach().clone()
        lowered[i, j] -= step
        numeric = (contrastive_loss(bumped, k, 0.5) - contrastive_loss(lowered, k, 0.5)).item() / (2 * step)
        # The loss runs in fp32 (logits in fp32 whatever the input): central differences at step 1e-3 of
        # a function of size ~1 carry fp32 rounding of about 1e-7 / 1e-3 = 1e-4.
        assert q.grad[i, j].item() == pytest.approx(numeric, abs=5e-4)


def test_saliency_loss_is_bce_against_the_thresholded_map() -> None:
    rng = np.random.default_rng(1)
    logits, saliency = rng.normal(size=(2, 1, 4, 4)), rng.uniform(size=(2, 1, 4, 4))
    target = (saliency > 0.5).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    expected = float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))
    ours = saliency_loss(torch.tensor(logits), torch.tensor(saliency), threshold=0.5)
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    # Only the threshold decides the target: a map just above it counts as salient, just below as not.
    confident = torch.full((1, 1, 1, 2), 10.0)  # both pixels predicted salient
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  (BCE of a logit against 1: softplus(-x))
    expected = (softplus(-10.0) + softplus(10.0)) / 2  # right on the first pixel, wrong on the second
    ours = saliency_loss(confident, torch.tensor([[[[0.51, 0.49]]]]), 0.5)
    assert ours.item() == pytest.approx(expected, rel=1e-6)
