"""How faithfully a predictor tracks the network under ablation: one scoring for every predictor.

A predictor (the reduced model fed directly, the reduced model fed propagated activations,
or gradient attribution) gives the target per ablation and sample; the network gives the
actual target. Both are compared as *changes* from the unablated run, which is what an
ablation experiment claims to explain.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def score_changes(actual_change: np.ndarray, predicted_change: np.ndarray, *, tolerance: float = 1e-6) -> dict:
    """R², Spearman correlation and sign agreement of predicted vs actual changes.

    Changes smaller than ``tolerance`` (relative to the spread of actual changes) carry no
    sign, so sign agreement is taken over the rest.
    """
    actual = np.asarray(actual_change, dtype=np.float64).ravel()
    predicted = np.asarray(predicted_change, dtype=np.float64).ravel()
    keep = np.isfinite(actual) & np.isfinite(predicted)
    actual, predicted = actual[keep], predicted[keep]
    if actual.size < 2:
        return {"r2": np.nan, "spearman": np.nan, "sign_agreement": np.nan, "n": int(actual.size)}
    residual = np.sum((actual - predicted) ** 2)
    total = np.sum((actual - actual.mean()) ** 2)
    scale = max(np.abs(actual).max(), 1e-12)
    signed = np.abs(actual) > tolerance * scale
    same_sign = np.sign(actual[signed]) == np.sign(predicted[signed])
    constant = np.ptp(actual) == 0 or np.ptp(predicted) == 0
    return {
        "r2": float(1 - residual / total) if total > 0 else (1.0 if residual == 0 else np.nan),
        "spearman": np.nan if constant else float(spearmanr(actual, predicted).statistic),
        "sign_agreement": float(same_sign.mean()) if signed.any() else np.nan,
        "n": int(actual.size),
    }
