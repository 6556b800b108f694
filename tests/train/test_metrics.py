"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from vpit.train.metrics import (
    exact_match,
    frechet_distance,
    frechet_distance_gaussians,
    mean_token_cosine,
    multiple_choice_correct,
    normalize_answer,
    retrieval_accuracy,
)


@pytest.mark.parametrize(
    "pred,answer,same",
    [
        ("Two.", "2", True),
        ("the Red circle!", "red circle", True),
        ("  top   left ", "top left", True),
        ("An orange", "orange", True),
        ("blue", "purple", False),
        ("3", "three", True),
        ("twenty", "20", False),
    ],
)
def test_exact_match_normalisation(pred, answer, same):
    assert exact_match(pred, answer) is same


def test_normalize_answer_exact_output():
    assert normalize_answer("The TWO red, circles.") == "2 red circles"


@pytest.mark.parametrize(
    "pred,correct",
    [
        ("B", True),
        ("(b)", True),
        ("B. square", True),
        ("square", True),
        ("A", False),
        ("circle", False),
        ("b. circle", False),
        ("D", False),
    ],
)
def test_multiple_choice(pred, correct):
    assert multiple_choice_correct(pred, ["circle", "square", "triangle"], 1) is correct


def test_frechet_distance_closed_form_1d_and_diagonal():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance_gaussians(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    ) == pytest.approx(4 + 1)
    # diagonal: sum over dimensions of the same
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance_gaussians(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # identical distributions: zero; a rotation of the covariance does not matter to itself
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    c = rot @ np.diag(v1) @ rot.T
    assert frechet_distance_gaussians(mu1, c, mu1, c) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_samples_approaches_known_answer():
    rng = np.random.default_rng(1)
    d, n = 4, 20000
    a = rng.normal(0.0, 1.0, size=(n, 1, d))
    b = rng.normal(0.5, 2.0, size=(n, 1, d))
    expected = d * 0.5**2 + d * (2.0 - 1.0) ** 2  # 1 + 4 = 5
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_retrieval_accuracy_constructed_cases():
    rng = np.random.default_rng(2)
    targets = rng.normal(size=(10, 4, 8))
    assert retrieval_accuracy(targets, targets) == 1.0
    assert retrieval_accuracy(np.roll(targets, 1, axis=0), targets) == 0.0
    half = targets.copy()
    half[5:] = np.roll(targets[5:], 1, axis=0)  # the last five retrieve a neighbour's target
    assert retrieval_accuracy(half, targets) == 0.5
    # a constant generator retrieves the same target for everyone: exactly one hit in ten
    assert retrieval_accuracy(np.ones_like(targets), targets) == pytest.approx(0.1)
    dup = np.concatenate([targets[:1], targets[:1]])
    assert retrieval_accuracy(dup, dup) == 0.0  # identical candidates tie, and ties are misses
    noisy = targets + 0.01 * rng.normal(size=targets.shape)
    assert retrieval_accuracy(noisy, targets, n_candidates=4) == 1.0


def test_mean_token_cosine():
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    y = np.array([[[3.0, 0.0], [2.0, 0.0]]])
    assert mean_token_cosine(x, y) == pytest.approx(0.5)  # cos 1 and cos 0
