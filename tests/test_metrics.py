"""Classification metrics from the confusion matrix, checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isaret.metrics import accuracy, confusion_matrix, macro_f1, per_class_scores, top_k_correct

sklearn_metrics = pytest.importorskip("sklearn.metrics")

CLASSES = 6


def random_predictions(seed: int, never_predicted: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Random targets over every class and predictions that never name `never_predicted`."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, CLASSES, size=200)
    targets[:CLASSES] = np.arange(CLASSES)
    predictions = rng.integers(0, CLASSES - 1, size=200)
    predictions[predictions >= never_predicted] += 1
    return targets, predictions


def confusion_of(targets: np.ndarray, predictions: np.ndarray) -> torch.Tensor:
    return confusion_matrix(torch.from_numpy(targets), torch.from_numpy(predictions), CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    targets, predictions = random_predictions(seed)
    confusion = confusion_of(targets, predictions)
    scores = per_class_scores(confusion)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        targets, predictions, labels=list(range(CLASSES)), zero_division=0)

    assert 4 not in set(predictions.tolist())
    assert accuracy(confusion) == pytest.approx(sklearn_metrics.accuracy_score(targets, predictions), abs=1e-12)
    np.testing.assert_allclose(scores["precision"].numpy(), precision, atol=1e-12)
    np.testing.assert_allclose(scores["recall"].numpy(), recall, atol=1e-12)
    np.testing.assert_allclose(scores["f1"].numpy(), f1, atol=1e-12)
    np.testing.assert_array_equal(scores["support"].numpy(), support)
    assert macro_f1(confusion) == pytest.approx(
        sklearn_metrics.f1_score(targets, predictions, average="macro", zero_division=0), abs=1e-12)


def test_confusion_matrix_matches_sklearn():
    targets, predictions = random_predictions(3)
    expected = sklearn_metrics.confusion_matrix(targets, predictions, labels=list(range(CLASSES)))
    confusion = confusion_of(targets, predictions)

    assert confusion.dtype == torch.int64
    np.testing.assert_array_equal(confusion.numpy(), expected)


def test_macro_f1_skips_absent_classes():
    # Class 5 occurs in neither targets nor predictions, as scikit-learn's labels=None leaves it out.
    targets = np.array([0, 0, 1, 1, 2, 2, 3])
    predictions = np.array([0, 1, 1, 1, 2, 0, 0])
    confusion = confusion_of(targets, predictions)

    assert macro_f1(confusion) == pytest.approx(
        sklearn_metrics.f1_score(targets, predictions, average="macro"), abs=1e-12)


def test_metrics_sum_across_shards():
    targets, predictions = random_predictions(4)
    whole = confusion_of(targets, predictions)
    parts = confusion_of(targets[:70], predictions[:70]) + confusion_of(targets[70:], predictions[70:])

    assert torch.equal(parts, whole)


def test_metrics_empty_confusion_zero():
    empty = torch.zeros(3, 3, dtype=torch.int64)

    assert accuracy(empty) == 0.0
    assert macro_f1(empty) == 0.0


def test_top_k_correct_counts():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.02, 0.08], [0.2, 0.3, 0.5]])
    targets = torch.tensor([2, 1, 2])

    assert top_k_correct(logits, targets, 1) == 1
    assert top_k_correct(logits, targets, 2) == 2
    assert top_k_correct(logits, targets, 5) == 3
