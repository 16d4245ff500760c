"""DR grading model: a ViT encoder and a linear head on a pooling of its final-normed tokens, trained as
a regression with thresholds (default) or a classification.

The pooling (`pool`): "cls+avg", the CLS token concatenated with the mean patch token (the paper's
recipe, the default); "token", the CLS token (timm's global_pool="token"); "avg", the mean patch token
(timm's global_pool="avg" with fc_norm=False). timm has no pooling that concatenates two vectors, so only
"token" and "avg" graders rebuild as a plain timm classifier (train/export.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssit_dist import atomic

POOLS = ("cls+avg", "token", "avg")


def regression_cuts(num_classes: int) -> tuple[float, ...]:
    """The outputs at which a regression grader's grade steps up: g + 0.5 between grades g and g + 1, so
    grade g <=> g - 0.5 <= output < g + 0.5 (the lowest and highest grades open-ended)."""
    return tuple(g + 0.5 for g in range(num_classes - 1))


class Grader(nn.Module):
    def __init__(
        self,
        encoder: VisionTransformer,
        objective: str = "regression",
        num_classes: int = 5,
        pool: str = "cls+avg",
        head_init_std: float | None = None,
    ):
        super().__init__()
        if objective not in ("regression", "classification"):
            raise ValueError(f"objective {objective!r}: expected regression or classification")
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: expected one of {', '.join(POOLS)}")
        self.encoder, self.objective, self.num_classes, self.pool = encoder, objective, num_classes, pool
        width = 2 * encoder.embed_dim if pool == "cls+avg" else encoder.embed_dim
        self.head = nn.Linear(width, 1 if objective == "regression" else num_classes)
        if head_init_std is not None:  # the linear probe's N(0, 0.01)
            nn.init.normal_(self.head.weight, std=head_init_std)
            nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads (timm's forward_head(pre_logits=True) for token / avg)."""
        tokens = self.encoder.forward_features(x)  # after the final norm
        cls, patches = tokens[:, 0], tokens[:, self.encoder.num_prefix_tokens :].mean(1)
        if self.pool == "token":
            return cls
        return patches if self.pool == "avg" else torch.cat([cls, patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, output: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
        if self.objective == "regression":
            return nn.functional.mse_loss(output.squeeze(1).float(), grades.float())
        return nn.functional.cross_entropy(output.float(), grades)

    def grades_and_scores(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted grades and per-grade scores (for AUC). Regression: the grade whose threshold
        interval holds the output; scores softmax(-(output - grade)^2), which rank samples by how close
        they land to each grade."""
        output = output.float()
        if self.objective == "classification":
            return output.argmax(1), output.softmax(1)
        y = output.squeeze(1)
        cuts = torch.tensor(regression_cuts(self.num_classes), device=y.device)
        grades = (y[:, None] >= cuts).sum(1)
        distance = (y[:, None] - torch.arange(self.num_classes, device=y.device)) ** 2
        return grades, (-distance).softmax(1)


def save_grader(grader: Grader, path: Path, meta: dict[str, Any]) -> None:
    """Weights (encoder.* in timm names, head.*) as safetensors, then the JSON beside them that rebuilds
    the model (`meta`: arch, timm_kwargs, img_size, objective, num_classes, ...); each atomically."""
    weights = {k: v.detach().float().cpu().contiguous() for k, v in grader.state_dict().items()}
    atomic.write_with(path, lambda tmp: save_file(weights, str(tmp)))
    atomic.write_json(path.with_suffix(".json"), meta)  # after the weights it describes


def load_grader(path: Path) -> tuple[Grader, dict[str, Any]]:
    """A Grader saved by `save_grader` (fine-tuning's best.safetensors / final.safetensors) and its JSON."""
    from ssit_dist.models.vit import create_encoder

    meta = json.loads(path.with_suffix(".json").read_text())
    encoder = create_encoder(meta["arch"], meta["img_size"], **meta["timm_kwargs"])
    grader = Grader(encoder, meta["objective"], meta["num_classes"], meta.get("pool", "cls+avg"))
    grader.load_state_dict(load_file(str(path)))
    return grader, meta
