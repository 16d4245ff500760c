"""Weighted k-nearest-neighbour grading on frozen encoder features.

Features are L2-normalised CLS tokens; each of the k most cosine-similar training samples votes for its
grade with weight exp(similarity / temperature) (temperature 0.07, as in self-supervised evaluation
practice); the grade with the largest vote wins, and the normalised votes serve as scores.
"""

from __future__ import annotations

import torch


def knn_grades(train_features: torch.Tensor, train_grades: torch.Tensor, test_features: torch.Tensor, k: int,
               num_classes: int = 5, temperature: float = 0.07, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
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
