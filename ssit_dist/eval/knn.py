"""Weighted k-nearest-neighbour grading on frozen encoder features.

Features are L2-normalised CLS tokens; each of the k most cosine-similar training samples votes for its
grade with weight exp(similarity / temperature) (temperature 0.07, as in self-supervised evaluation
practice); the grade with the largest vote wins, and the normalised votes serve as scores.

torch and the evaluation stack are imported where they run, not at the top: the `ssit-dist` command
reads KnnConfig for its options every time it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from ssit_dist.configclass import configclass, require, restate
from ssit_dist.sections import EncoderSource

if TYPE_CHECKING:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from ssit_dist.data.index import ShardIndex
    from ssit_dist.data.loading.labelled import SplitSource


@configclass
class KnnConfig(EncoderSource):
    """What `ssit-dist knn` grades, by which encoder's features (EncoderSource: init, arch, timm_kwargs,
    trust_pickle, img_size), and how."""

    init: str = restate(EncoderSource, "init")  # required: no default encoder to grade
    train: str = Field(description="neighbour shards: FOLDER[:SPLIT] (split default: train)")
    test: str = Field(description="shards to grade: FOLDER[:SPLIT] (split default: test)")
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="neighbour counts, each graded on its own")
    temperature: float = Field(default=0.07, description="vote weight exp(similarity / temperature)", gt=0)
    num_classes: int = Field(default=5, description="grades 0..num_classes-1", ge=2)
    batch: int = Field(default=64, description="images per encoder forward", ge=1)
    retrieval_samples: int = Field(
        default=256, description="test photographs for view retrieval (two fixed views each)", ge=2
    )

    def validate(self) -> None:
        require(
            bool(self.ks) and min(self.ks) >= 1, "ks", self.ks, "expected one or more neighbour counts, each at least 1"
        )


def knn_grades(
    train_features: torch.Tensor,
    train_grades: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    num_classes: int = 5,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted grades, per-grade scores) for every test row."""
    import torch

    if not 0 < k <= len(train_features):
        raise ValueError(f"k = {k} needs between 1 and {len(train_features)} training samples")
    bank = torch.nn.functional.normalize(train_features.float(), dim=1)
    grades, scores = [], []
    for start in range(0, len(test_features), chunk):
        queries = torch.nn.functional.normalize(test_features[start : start + chunk].float(), dim=1)
        similarity, neighbour = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes)
        votes.scatter_add_(1, train_grades[neighbour], (similarity / temperature).exp())
        scores.append(votes / votes.sum(1, keepdim=True))
        grades.append(votes.argmax(1))
    return torch.cat(grades), torch.cat(scores)


def knn_evaluate(config: KnnConfig) -> dict:
    """kNN grading of the `config.test` split by the `config.train` split's CLS features of the encoder
    `config.init` (resized to `img_size`, normalised with the train split's mean/std). Returns metrics
    per k, and the view retrieval (ssit_dist.eval.retrieval) of the encoder on up to `retrieval_samples`
    test photographs, two views each by the reference's recipe."""
    import torch
    from accelerate import Accelerator

    from ssit_dist.data.loading.labelled import SplitSource, check_labels
    from ssit_dist.models.pretrained import load_encoder

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    sources = {"train": SplitSource.parse(config.train, "train"), "test": SplitSource.parse(config.test, "test")}
    # Both splits' labels are checked before the encoder loads; the train split's mean/std normalise both.
    stats, _ = (check_labels(s, config.num_classes) for s in sources.values())
    encoder, origin = load_encoder(config.init, config.img_size, config.arch, config.timm_kwargs, config.trust_pickle)
    encoder.to(accelerator.device).eval()
    embed = lambda x: encoder.forward_features(x.to(accelerator.device))[:, 0]  # noqa: E731
    train, test = (_features(config, embed, s, stats, accelerator) for s in sources.values())
    return {
        "init": config.init,
        "encoder": origin.kind,
        "train": str(sources["train"]),
        "test": str(sources["test"]),
        "temperature": config.temperature,
        "img_size": config.img_size,
        "missing": train.missing + test.missing,
        "k": {str(k): _grade(config, train, test, k) for k in config.ks},
        "view_retrieval": _view_retrieval(config, embed, sources["test"], stats),
    }


@dataclass
class _Features:
    """CLS features of a split's samples that decoded, their grades, and the keys of those that did not."""

    features: np.ndarray
    grades: np.ndarray
    missing: list[str]


def _features(
    config: KnnConfig,
    embed: Callable[[torch.Tensor], torch.Tensor],
    source: SplitSource,
    stats: ShardIndex,
    accelerator: Accelerator,
) -> _Features:
    """One split through the encoder, normalised with the train split's `stats`."""
    import numpy as np

    from ssit_dist.data.loading.grading_transforms import eval_transform
    from ssit_dist.data.loading.labelled import LabelledShards
    from ssit_dist.eval.over_split import missing, run_over_split

    transform = eval_transform(config.img_size, stats.mean, stats.std)
    data = LabelledShards(source, transform, config.num_classes)
    indices, features = run_over_split(embed, data, accelerator, config.batch)
    return _Features(features, np.array(data.grades)[indices], missing(data, indices))


def _grade(config: KnnConfig, train: _Features, test: _Features, k: int) -> dict:
    """Grading metrics of the test split by its k nearest training samples."""
    import torch

    from ssit_dist.eval.metrics import grading_metrics

    grades, scores = knn_grades(
        torch.from_numpy(train.features),
        torch.tensor(train.grades),
        torch.from_numpy(test.features),
        k,
        config.num_classes,
        config.temperature,
    )
    return grading_metrics(test.grades, grades.numpy(), scores.numpy(), config.num_classes)


def _view_retrieval(
    config: KnnConfig, embed: Callable[[torch.Tensor], torch.Tensor], test: SplitSource, stats: ShardIndex
) -> dict:
    """Top-1 view retrieval of the encoder on the test split's first `retrieval_samples` photographs."""
    from ssit_dist.data.loading.augment import PairAugment
    from ssit_dist.data.loading.sources import open_shards
    from ssit_dist.eval.retrieval import fixed_pairs, retrieval_top1

    augment = PairAugment(config.img_size, stats.mean, stats.std)
    x1, x2 = fixed_pairs(open_shards([test.folder], test.split), augment, config.retrieval_samples)
    top1 = retrieval_top1(embed, x1, x2, config.batch)
    return {"samples": len(x1), "top1": top1, "chance": 1 / len(x1)}
