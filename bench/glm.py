"""The reduced-model GLM: time per target, and side by side with statsmodels and the seed's COBYLA.

One simulated data set serves every arm: 10,000 samples × 1,000 input features (2 groups × 10
layer distances × 50 token lags, Poisson counts whose rate is shared within each of 200 blocks),
3 history lags, a separable excitatory/inhibitory filter and a logistic output. Bases:
log raised cosines, 6 over distance × 10 over lag, so the full-grid filter has 120 coefficients
and the separable one 2 × (6 + 10) = 32 (+ 3 history weights + intercept).

- ``glm_seconds_per_target``: one ``ReducedModel(n_jobs=-1).fit`` on all 10,000 samples — input
  checks, basis projection, the 8-α path on all samples, 5-fold block cross-validation at each α
  (its 40 fold fits on every core, as the pipeline's fit stage runs them), the empirical
  nonlinearity; also the same on one thread (``n_jobs=None``) and at a fixed α (no CV).
- ``glm_vs_statsmodels``: statsmodels' IRLS GLM (unpenalised) on the same 123-column projected
  design, against the full-grid ReducedModel; held-out AUROC of both on the same test blocks.
- ``glm_vs_cobyla_speedup``: the seed's approach, derivative-free maximisation of training AUROC
  with scipy's COBYLA over the separable model's 35 parameters (s, t per group, history), against
  the same separable model fitted by likelihood, like for like: unpenalised, so neither arm
  selects a model (``ReducedModel(alpha=0)``). Also reported: the separable ReducedModel with its
  cross-validation (``glm_vs_cobyla_speedup_with_cv``) and at the α it chose; held-out AUROC of
  every arm. COBYLA runs until its trust region shrinks to 1e-4 or 5,000 evaluations.
- peak memory: the traced Python/numpy peak during one fit, and the process's maximum RSS.

Times are wall-clock seconds (CPU seconds alongside) on whatever machine runs this; every arm
uses one BLAS thread (ReducedModel limits itself to one; the others are limited to match), and
every arm compared with a peer runs in one thread.

Timings go through :func:`bench.timing.interleaved`: the arms of each comparison run side by side
(after an untimed first fit of each kind); ratios are medians of per-repetition ratios.

    python -m bench.glm [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import tracemalloc

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from reduce.basis import LogRaisedCosine
from reduce.reduced import ReducedModel, as_dataset, evaluate, split_by_block

from .timing import interleaved

GROUPS, DISTANCES, LAGS, HISTORY = 2, 10, 50, 3
GOAL_SECONDS = 1.0


def simulate(n_samples: int, seed: int = 0):
    """Inputs, history, a bernoulli target and the generating drive."""
    rng = np.random.default_rng(seed)
    distance, lag = np.arange(1, DISTANCES + 1), np.arange(LAGS)
    spatial = np.stack([np.exp(-(distance - 1) / 3.0), -0.8 * np.exp(-((distance - 4.0) ** 2) / 8.0)])
    temporal = np.stack([lag * np.exp(-lag / 4.0), (lag + 1) * np.exp(-lag / 10.0)])
    temporal /= np.linalg.norm(temporal, axis=1, keepdims=True)
    filters = spatial[:, :, None] * temporal[:, None, :]
    blocks = rng.integers(200, size=n_samples)
    rate = rng.gamma(4.0, 0.05, size=200)[blocks]
    inputs = rng.poisson(rate[:, None, None, None], size=(n_samples, GROUPS, DISTANCES, LAGS)).astype(float)
    history = rng.binomial(1, 0.3, size=(n_samples, HISTORY)).astype(float)
    drive = np.einsum("ngdl,gdl->n", inputs, filters)
    drive = 1.5 * (drive - drive.mean()) / drive.std() + history @ np.array([-2.5, -1.0, -0.3]) - 1.0
    target = rng.binomial(1, 1.0 / (1.0 + np.exp(-drive))).astype(float)
    dataset = as_dataset(inputs, target, history=history, blocks=blocks, groups=["exc", "inh"], distances=distance, lags=lag)
    return dataset, drive


def auroc(scores, positive) -> float:
    """Mann–Whitney AUROC from ranks (ties averaged): the fastest exact form, for COBYLA's objective."""
    n_positive = positive.sum()
    return float((rankdata(scores)[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * (len(scores) - n_positive)))


def projected_design(dataset):
    """Centred inputs projected on the orthonormalised bases (sample, group, 6, 10), and history."""
    spatial, _ = np.linalg.qr(LogRaisedCosine(6).evaluate(dataset["distance"].values))
    temporal, _ = np.linalg.qr(LogRaisedCosine(10).evaluate(dataset["lag"].values))
    inputs = dataset["inputs"].values
    features = np.einsum("ngdl,dr,ls->ngrs", inputs - inputs.mean(axis=0), spatial, temporal, optimize=True)
    history = dataset["history"].values
    return features, history - history.mean(axis=0)


def statsmodels_arm(train, test):
    """statsmodels' IRLS on the projected design: (the fit to time, what to report of its result)."""
    import statsmodels.api as sm

    features, history = projected_design(train)
    design = sm.add_constant(np.concatenate([features.reshape(len(features), -1), history], axis=1))
    # Centring the test set with its own means shifts every drive by one constant: AUROC is unchanged.
    test_features, test_history = projected_design(test)
    test_design = sm.add_constant(np.concatenate([test_features.reshape(len(test_features), -1), test_history], axis=1), has_constant="add")

    def fit():
        with threadpool_limits(limits=1, user_api="blas"):  # the same single BLAS thread ReducedModel uses
            return sm.GLM(train["target"].values, design, family=sm.families.Binomial()).fit()

    def report(result) -> dict:
        return {"test_auroc": auroc(test_design @ result.params, test["target"].values == 1), "converged": bool(result.converged)}

    return fit, report


def cobyla_arm(train, test, max_evaluations: int):
    """Maximise training AUROC over s_g, t_g (orthonormal basis coefficients) and history weights:
    (the optimisation to time, what to report of its result)."""
    features, history = projected_design(train)
    test_features, test_history = projected_design(test)
    positive, test_positive = train["target"].values == 1, test["target"].values == 1
    n_spatial, n_temporal = features.shape[2:]

    def drive(parameters, features, history):
        spatial = parameters[: GROUPS * n_spatial].reshape(GROUPS, n_spatial)
        temporal = parameters[GROUPS * n_spatial : GROUPS * (n_spatial + n_temporal)].reshape(GROUPS, n_temporal)
        return np.einsum("ngrs,gr,gs->n", features, spatial, temporal, optimize=True) + history @ parameters[-HISTORY:]

    start = np.concatenate([np.full(GROUPS * n_spatial, 0.1), np.full(GROUPS * n_temporal, 1 / np.sqrt(n_temporal)), np.zeros(HISTORY)])
    objective = lambda parameters: -auroc(drive(parameters, features, history), positive)  # noqa: E731

    def fit():
        with threadpool_limits(limits=1, user_api="blas"):
            return minimize(objective, start, method="COBYLA", options={"maxiter": max_evaluations, "rhobeg": 0.5, "tol": 1e-4})

    def report(result) -> dict:
        return {
            "evaluations": int(result.nfev),
            "parameters": len(start),
            "stopped": str(result.message),
            "train_auroc": -float(result.fun),
            "test_auroc": auroc(drive(result.x, test_features, test_history), test_positive),
        }

    return fit, report


def _keeping(results: dict, name: str, function):
    """An arm that also keeps what ``function`` returns (the last repetition's) under ``name``."""

    def arm():
        results[name] = function()

    return arm


def run(quick: bool = False) -> dict:
    # One BLAS thread for the whole stage, set-up included: a pool left running by a parallel
    # call spins on the other core and would count as CPU time of whichever arm runs next.
    with threadpool_limits(limits=1, user_api="blas"):
        return _run(quick)


def _run(quick: bool) -> dict:
    n_samples = 1000 if quick else 10_000
    repetitions = 1 if quick else 3
    dataset, drive = simulate(n_samples)
    train_rows, test_rows = split_by_block(dataset["block"].values, 0.2, seed=0)
    train, test = dataset.isel(sample=train_rows), dataset.isel(sample=test_rows)
    truth_auroc = auroc(drive[test_rows], test["target"].values == 1)
    fitted: dict = {}

    # Untimed first fits: they pay the one-time costs (lazy imports, first allocations) and give
    # the alphas cross-validation picks, for the fixed-alpha arms.
    chosen = ReducedModel().fit(dataset)
    separable_train, full_train = ReducedModel().fit(train), ReducedModel(structure="full").fit(train)

    per_target = interleaved(
        {
            "separable_cv": _keeping(fitted, "separable_cv", lambda: ReducedModel(n_jobs=-1).fit(dataset)),
            "separable_cv_one_thread": lambda: ReducedModel().fit(dataset),
            "separable_fixed_alpha": lambda: ReducedModel(alpha=chosen.alpha_).fit(dataset),
            "full_grid_cv": lambda: ReducedModel(structure="full", n_jobs=-1).fit(dataset),
        },
        repetitions,
        warmup=0,
    )
    statsmodels_fit, statsmodels_report = statsmodels_arm(train, test)
    versus_statsmodels = interleaved(
        {
            "statsmodels_irls": _keeping(fitted, "statsmodels", statsmodels_fit),
            "reduce_full_grid_cv": _keeping(fitted, "full_grid", lambda: ReducedModel(structure="full").fit(train)),
            "reduce_full_grid_fixed_alpha": _keeping(fitted, "full_grid_fixed", lambda: ReducedModel(structure="full", alpha=full_train.alpha_).fit(train)),
        },
        repetitions,
        warmup=0,
    )
    cobyla_fit, cobyla_report = cobyla_arm(train, test, max_evaluations=200 if quick else 5000)
    versus_cobyla = interleaved(
        {
            "cobyla": _keeping(fitted, "cobyla", cobyla_fit),
            "reduce_separable_cv": _keeping(fitted, "separable", lambda: ReducedModel().fit(train)),
            "reduce_separable_fixed_alpha": _keeping(fitted, "separable_fixed", lambda: ReducedModel(alpha=separable_train.alpha_).fit(train)),
            "reduce_separable_unpenalised": _keeping(fitted, "separable_unpenalised", lambda: ReducedModel(alpha=0.0).fit(train)),
        },
        1,
        warmup=0,
    )

    tracemalloc.start()
    ReducedModel().fit(dataset)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    statsmodels_result = {"seconds": versus_statsmodels.median("statsmodels_irls"), "cpu_seconds": versus_statsmodels.median_cpu("statsmodels_irls"), **statsmodels_report(fitted["statsmodels"])}
    cobyla = {"seconds": versus_cobyla.median("cobyla"), "cpu_seconds": versus_cobyla.median_cpu("cobyla"), **cobyla_report(fitted["cobyla"])}
    wall, cpu = per_target.median("separable_cv"), per_target.median_cpu("separable_cv")
    arm = lambda timings, name, model, label: {"seconds": timings.median(name), "cpu_seconds": timings.median_cpu(name), "test_auroc": evaluate(model, test)["auroc"], "with": label}  # noqa: E731
    return {
        "samples": n_samples,
        "features": GROUPS * DISTANCES * LAGS,
        "grid": f"{GROUPS} groups × {DISTANCES} distances × {LAGS} lags, {HISTORY} history lags",
        "repetitions": repetitions,
        "threads": "one BLAS thread in every arm; cross-validation fits on every core in the per-target arms with CV, one thread elsewhere",
        "cores": os.cpu_count(),
        "glm_seconds_per_target": wall,
        "glm_cpu_seconds_per_target": cpu,
        "glm_goal_seconds": GOAL_SECONDS,
        "glm_ratio_to_goal": wall / GOAL_SECONDS,
        "glm_seconds_per_target_one_thread": per_target.median("separable_cv_one_thread"),
        "glm_cpu_seconds_per_target_one_thread": per_target.median_cpu("separable_cv_one_thread"),
        "glm_seconds_single_alpha": per_target.median("separable_fixed_alpha"),
        "glm_cpu_seconds_single_alpha": per_target.median_cpu("separable_fixed_alpha"),
        "glm_full_grid_seconds_per_target": per_target.median("full_grid_cv"),
        "glm_full_grid_cpu_seconds_per_target": per_target.median_cpu("full_grid_cv"),
        "glm_converged": fitted["separable_cv"].converged_,
        "per_target_timings": per_target.summary(),
        "truth_test_auroc": truth_auroc,
        "glm_vs_statsmodels": {
            "design": "123 columns: 2 × 6 × 10 projected inputs + 3 history (unpenalised IRLS)",
            "statsmodels": statsmodels_result,
            "reduce_full_grid": arm(versus_statsmodels, "reduce_full_grid_cv", fitted["full_grid"], "5-fold CV over 8 alphas"),
            "reduce_full_grid_fixed_alpha": arm(versus_statsmodels, "reduce_full_grid_fixed_alpha", fitted["full_grid_fixed"], "the alpha CV chose"),
            "time_ratio": versus_statsmodels.ratio("statsmodels_irls", "reduce_full_grid_cv"),
            "time_ratio_fixed_alpha": versus_statsmodels.ratio("statsmodels_irls", "reduce_full_grid_fixed_alpha"),
        },
        "glm_vs_cobyla_speedup": versus_cobyla.ratio("cobyla", "reduce_separable_unpenalised"),
        "glm_vs_cobyla_speedup_cpu": versus_cobyla.cpu_ratio("cobyla", "reduce_separable_unpenalised"),
        "glm_vs_cobyla_speedup_with_cv": versus_cobyla.ratio("cobyla", "reduce_separable_cv"),
        "glm_vs_cobyla_speedup_with_cv_cpu": versus_cobyla.cpu_ratio("cobyla", "reduce_separable_cv"),
        "glm_vs_cobyla_speedup_fixed_alpha": versus_cobyla.ratio("cobyla", "reduce_separable_fixed_alpha"),
        "glm_vs_cobyla_speedup_fixed_alpha_cpu": versus_cobyla.cpu_ratio("cobyla", "reduce_separable_fixed_alpha"),
        "cobyla": cobyla,
        "glm_separable": arm(versus_cobyla, "reduce_separable_cv", fitted["separable"], "5-fold CV over 8 alphas"),
        "glm_separable_fixed_alpha": arm(versus_cobyla, "reduce_separable_fixed_alpha", fitted["separable_fixed"], "the alpha CV chose"),
        "glm_separable_unpenalised": arm(versus_cobyla, "reduce_separable_unpenalised", fitted["separable_unpenalised"], "alpha = 0"),
        "peak_traced_memory_mb": traced_peak / 2**20,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(results: dict) -> str:
    statsmodels_arm_, reduce_arm = results["glm_vs_statsmodels"]["statsmodels"], results["glm_vs_statsmodels"]["reduce_full_grid"]
    cobyla, separable = results["cobyla"], results["glm_separable"]
    rows = [
        ("data", f"{results['samples']} samples × {results['features']} features ({results['grid']})"),
        ("glm_seconds_per_target", f"{results['glm_seconds_per_target']:.2f} s wall, {results['glm_cpu_seconds_per_target']:.2f} s CPU (separable, CV on {results['cores']} cores) = {results['glm_ratio_to_goal']:.2f} × the {results['glm_goal_seconds']:.0f} s goal"),
        ("  on one thread", f"{results['glm_seconds_per_target_one_thread']:.2f} s wall, {results['glm_cpu_seconds_per_target_one_thread']:.2f} s CPU"),
        ("  at a fixed alpha", f"{results['glm_seconds_single_alpha']:.2f} s wall, {results['glm_cpu_seconds_single_alpha']:.2f} s CPU"),
        ("  full grid, CV", f"{results['glm_full_grid_seconds_per_target']:.2f} s wall, {results['glm_full_grid_cpu_seconds_per_target']:.2f} s CPU"),
        ("truth test AUROC", f"{results['truth_test_auroc']:.4f}"),
        ("glm_vs_statsmodels", f"statsmodels {statsmodels_arm_['seconds']:.2f} s ({statsmodels_arm_['cpu_seconds']:.2f} s CPU), AUROC {statsmodels_arm_['test_auroc']:.4f} | reduce full grid with CV {reduce_arm['seconds']:.2f} s ({reduce_arm['cpu_seconds']:.2f} s CPU), AUROC {reduce_arm['test_auroc']:.4f} | statsmodels/reduce time {results['glm_vs_statsmodels']['time_ratio']:.2f}"),
        ("  reduce at a fixed alpha", f"{results['glm_vs_statsmodels']['reduce_full_grid_fixed_alpha']['seconds']:.2f} s, AUROC {results['glm_vs_statsmodels']['reduce_full_grid_fixed_alpha']['test_auroc']:.4f} | statsmodels/reduce time {results['glm_vs_statsmodels']['time_ratio_fixed_alpha']:.2f}"),
        ("glm_vs_cobyla_speedup", f"{results['glm_vs_cobyla_speedup']:.1f}× wall, {results['glm_vs_cobyla_speedup_cpu']:.1f}× CPU unpenalised (like for like); {results['glm_vs_cobyla_speedup_with_cv']:.1f}× wall with CV; {results['glm_vs_cobyla_speedup_fixed_alpha']:.1f}× wall at the alpha CV chose (goal ≥ 50×)"),
        ("  COBYLA", f"{cobyla['seconds']:.2f} s ({cobyla['cpu_seconds']:.2f} s CPU), {cobyla['evaluations']} evaluations of {cobyla['parameters']} parameters, train AUROC {cobyla['train_auroc']:.4f}, test AUROC {cobyla['test_auroc']:.4f}"),
        ("  reduce separable", f"{separable['seconds']:.2f} s ({separable['cpu_seconds']:.2f} s CPU) with CV, test AUROC {separable['test_auroc']:.4f}"),
        ("  at a fixed alpha", f"{results['glm_separable_fixed_alpha']['seconds']:.2f} s ({results['glm_separable_fixed_alpha']['cpu_seconds']:.2f} s CPU), test AUROC {results['glm_separable_fixed_alpha']['test_auroc']:.4f}"),
        ("  unpenalised", f"{results['glm_separable_unpenalised']['seconds']:.2f} s ({results['glm_separable_unpenalised']['cpu_seconds']:.2f} s CPU), test AUROC {results['glm_separable_unpenalised']['test_auroc']:.4f}"),
        ("peak memory", f"{results['peak_traced_memory_mb']:.0f} MB traced during one fit, {results['max_rss_mb']:.0f} MB max RSS"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(table(run(parser.parse_args().quick)))
