import numpy as np
import pytest

from reduce.faithfulness import score_changes


def test_perfect_prediction_scores_one():
    actual = np.random.default_rng(0).normal(size=(5, 20))
    scores = score_changes(actual, actual.copy())
    assert scores["r2"] == pytest.approx(1.0)
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["sign_agreement"] == 1.0
    assert scores["n"] == 100


def test_sign_flip_and_noise():
    actual = np.random.default_rng(1).normal(size=200)
    flipped = score_changes(actual, -actual)
    assert flipped["sign_agreement"] == 0.0 and flipped["spearman"] == pytest.approx(-1.0)
    noisy = score_changes(actual, actual + np.random.default_rng(2).normal(scale=0.5, size=200))
    assert 0.6 < noisy["r2"] < 0.9  # noise with a quarter of the variance
    assert 0.6 < noisy["sign_agreement"] < 0.95


def test_zero_changes_carry_no_sign_and_nan_is_ignored():
    actual = np.array([0.0, 0.0, 1.0, -2.0, np.nan])
    predicted = np.array([5.0, -5.0, 2.0, -1.0, 3.0])
    scores = score_changes(actual, predicted)
    assert scores["sign_agreement"] == 1.0 and scores["n"] == 4
