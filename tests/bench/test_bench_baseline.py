"""bench/perf/model_step.py's reference-style step is a baseline only if it computes what ours computes."""

from __future__ import annotations

import torch

from bench.perf import model_step
from tiny_model import batch, tiny


def test_reference_style_query_side_computes_our_losses_view_by_view() -> None:
    model = tiny().train()
    x1, x2, s1, s2 = batch()
    k1, k2 = model.momentum(x1, s1), model.momentum(x2, s2)
    ours = model.online(x1, x2, s1, s2, k1, k2)
    reference = model_step.reference_online_forward(model.online, x1, x2, s1, s2, k1, k2)
    # Our forward sends both views through the encoder in one pass; its matmuls may sum in another order
    # than per-view ones (fp32 rounding, ~1e-7 relative), a mix-up of views or statistics changes the
    # losses by O(0.1).
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    swapped = model_step.reference_online_forward(model.online, x1, x2, s1, s2, k2, k1)
    assert (swapped[0] - ours[0]).abs() > 1e-2


def test_profile_counts_the_matrix_products_of_this_torch() -> None:
    # The matmul-bound ceiling divides by this time: if torch renamed its matmul operators it would be 0.
    linear, conv = torch.nn.Linear(256, 256), torch.nn.Conv2d(3, 16, 4, stride=4)
    x, image = torch.randn(512, 256), torch.randn(8, 3, 64, 64)

    def step(x: torch.Tensor, image: torch.Tensor) -> float:
        with torch.no_grad():
            return float(linear(x).sum() + (x @ x.T).sum() + torch.bmm(x[None], x.T[None]).sum() + conv(image).sum())

    summary = model_step.profile_step(step, (x, image))
    ops = {row["op"] for row in summary["top_operators"]}
    assert set(model_step.MATMUL_OPERATORS) - {"aten::baddbmm"} <= ops
    assert summary["matmul_s_per_step"] > 0
