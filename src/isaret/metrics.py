"""Classification metrics from a confusion matrix, which sums exactly across processes."""

from __future__ import annotations

import torch


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return counts (true class, predicted class) as an int64 (C, C) tensor."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    total = int(confusion.sum())
    return float(confusion.diagonal().sum()) / total if total else 0.0


def per_class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class; a 0/0 ratio counts as 0, as scikit-learn's default."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    predicted = confusion.sum(dim=0)
    support = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(support > 0, true_positive / support.clamp(min=1), torch.zeros_like(support))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12),
                     torch.zeros_like(denominator))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long()}


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the targets or the predictions (scikit-learn's labels=None)."""
    scores = per_class_scores(confusion)
    present = (confusion.sum(dim=0) + confusion.sum(dim=1)) > 0
    return float(scores["f1"][present].mean()) if present.any() else 0.0


def top_k_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == targets.unsqueeze(-1)).any(dim=-1).sum())
