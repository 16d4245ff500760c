"""bench/model_step.py's reference-style step is a baseline only if it computes what ours computes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_model import batch, tiny

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model_step.py"


def test_reference_style_query_side_computes_our_losses_view_by_view(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("model_step", BENCH)
    assert spec is not None and spec.loader is not None
    model_step = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "model_step", model_step)  # where its dataclasses look themselves up
    spec.loader.exec_module(model_step)
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
