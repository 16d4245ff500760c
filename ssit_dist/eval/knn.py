"""Weighted k-nearest-neighbour grading on frozen encoder features.

Features are L2-normalised CLS tokens; each of the k most cosine-similar training samples votes for its
grade with weight exp(similarity / temperature) (temperature 0.07, as in self-supervised evaluation
practice); the grade with the largest vote wins, and the normalised votes serve as scores.
"""

from __future__ import annotations

import torch


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


def knn_evaluate(
    train: str,
    test: str,
    init: str,
    img_size: int,
    ks: tuple[int, ...] = (5, 10, 20),
    temperature: float = 0.07,
    arch: str | None = None,
    timm_kwargs: dict | None = None,
    trust_pickle: bool = False,
    num_classes: int = 5,
    batch: int = 64,
    retrieval_samples: int = 256,
) -> dict:
    """kNN grading of the `test` split by the `train` split's CLS features of the encoder `init`
    (resized to `img_size`, normalised with the train split's mean/std). Returns metrics per k, and the
    view retrieval (ssit_dist.eval.retrieval) of the encoder on up to `retrieval_samples` test
    photographs, two views each by the reference's recipe."""
    import numpy as np
    from accelerate import Accelerator

    from ssit_dist.data.augment import PairAugment
    from ssit_dist.data.grading_transforms import eval_transform
    from ssit_dist.data.labelled import LabelledShards, SplitSource, check_labels
    from ssit_dist.data.sources import open_shards
    from ssit_dist.eval.metrics import grading_metrics
    from ssit_dist.eval.predict import missing, run_over_split
    from ssit_dist.eval.retrieval import fixed_pairs, retrieval_top1
    from ssit_dist.models.pretrained import load_encoder

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    sources = {"train": SplitSource.parse(train, "train"), "test": SplitSource.parse(test, "test")}
    indexes = {name: check_labels(s, num_classes) for name, s in sources.items()}  # fail before loading
    encoder, origin = load_encoder(init, img_size, arch, timm_kwargs, trust_pickle)
    encoder.to(accelerator.device).eval()
    transform = eval_transform(img_size, indexes["train"].mean, indexes["train"].std)
    data = {name: LabelledShards(s, transform, num_classes) for name, s in sources.items()}
    features = {
        name: run_over_split(lambda x: encoder.forward_features(x)[:, 0], ds, accelerator, batch)
        for name, ds in data.items()
    }
    train_idx, train_feat = features["train"]
    test_idx, test_feat = features["test"]
    train_grades = torch.tensor(np.array(data["train"].grades)[train_idx])
    truth = np.array(data["test"].grades)[test_idx]
    result: dict = {
        "init": init,
        "encoder": origin.kind,
        "train": str(sources["train"]),
        "test": str(sources["test"]),
        "temperature": temperature,
        "img_size": img_size,
        "missing": missing(data["train"], train_idx) + missing(data["test"], test_idx),
        "k": {},
    }
    test_shards = open_shards([sources["test"].folder], sources["test"].split)
    x1, x2 = fixed_pairs(
        test_shards, PairAugment(img_size, indexes["train"].mean, indexes["train"].std), retrieval_samples
    )
    top1 = retrieval_top1(lambda x: encoder.forward_features(x.to(accelerator.device))[:, 0], x1, x2, batch)
    result["view_retrieval"] = {"samples": len(x1), "top1": top1, "chance": 1 / len(x1)}
    for k in ks:
        grades, scores = knn_grades(
            torch.from_numpy(train_feat), train_grades, torch.from_numpy(test_feat), k, num_classes, temperature
        )
        result["k"][str(k)] = grading_metrics(truth, grades.numpy(), scores.numpy(), num_classes)
    return result
