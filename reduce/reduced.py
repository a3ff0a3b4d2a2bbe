"""The reduced model: a sparse GLM whose weights are spatial × temporal filters per input group.

    drive[n] = intercept + Σ_g Σ_d Σ_l F_g(d, l) · inputs[n, g, d, l] + Σ_h H(h) · history[n, h]
    E[target | drive] = link⁻¹(drive)       (or a monotone non-parametric nonlinearity)

Data is an ``xr.Dataset`` with ``inputs`` (sample, group, distance, lag), ``target`` (sample),
optional ``history`` (sample, history_lag) and an optional ``block`` coordinate on ``sample``
(e.g. the prompt) whose samples always stay on the same side of a split or fold.

How it is fitted
----------------
Each filter lies in the span of a spatial basis (over distance) times a temporal basis (over lag),
both orthonormalised on the grid, so a filter's coefficients have the Euclidean norm of the
filter and its rank-1 SVD is the SVD of the filter on the grid. Inputs and history are centred.
With c_g = ‖drive contribution of group g‖ / √n (the RMS over samples of Σ_dl F_g x_g) and c_h the
same for the history term, the objective is

    mean negative log-likelihood + α [ρ Σ_g ω_g c_g + (1 − ρ)/2 (Σ_g c_g² + c_h²)]

with ρ = ``l1_ratio`` and ω_g = √(coefficients of F_g): a group lasso that can drop a whole input
group (e.g. the inhibitory one), plus an optional ridge part; the history term is never dropped.
Penalising each group's contribution rather than its coefficients (the standardised group lasso)
makes the penalty independent of the basis parametrisation and of the inputs' scale. In whitened
coordinates (each group's design orthonormalised) the proximal step is closed-form block
soft-thresholding, so proximal Newton (narrow designs: a few iterations, each one weighted Gram)
or FISTA (wide designs: accelerated proximal gradient with adaptive restart) minimises the
objective exactly; no library offers this penalty for these families.

``structure="separable"`` constrains F_g(d, l) = s_g(d) · t_g(l). The objective restricted to
rank-1 filters is biconvex; it is minimised by alternating exact convex steps over s (t fixed)
and t (s fixed) — each step is again a standardised group lasso. The scale and sign ambiguity is
removed by ‖t_g‖ = 1 on the grid and Σ_l t_g(l) ≥ 0, so an inhibitory group shows up as a
negative spatial filter.

α is chosen by K-fold cross-validation (held-out deviance) over a log-spaced path from α_max
(every group dropped) down, with folds that never split a block: the fit on all samples follows
the path, each α warm-started from the previous one, and each fold's fit at an α starts from the
all-samples fit at that α (the fold fits run on threads with ``n_jobs``).
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import numba
import numpy as np
import pandas as pd
import xarray as xr
from joblib import effective_n_jobs
from scipy.special import expit, logit, xlogy
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController

from .basis import Basis, Constant, LogRaisedCosine, basis_from_dict
from .errors import ReduceError
from .store import write_netcdf

INPUT_DIMS = ("sample", "group", "distance", "lag")
HISTORY_DIMS = ("sample", "history_lag")
PRIMARY_METRIC = {"bernoulli": "auroc", "gaussian": "r2", "poisson": "deviance_explained"}
STRUCTURES = ("separable", "full")
NONLINEARITIES = ("link", "empirical")
ALPHA_RULES = ("min", "1se")


# ----------------------------------------------------------------------------------------------
# Families (all with canonical links, so the loss gradient with respect to the drive is mean − y)


def _bernoulli_deviance(y, mean):
    mean = np.clip(mean, 1e-12, 1 - 1e-12)
    return -2.0 * (y * np.log(mean) + (1 - y) * np.log1p(-mean))


def _poisson_deviance(y, mean):
    mean = np.maximum(mean, 1e-300)
    return 2.0 * (xlogy(y, y / mean) - (y - mean))


@dataclass(frozen=True)
class Family:
    name: str
    mean: Callable  # inverse link
    code: int  # the compiled solvers' number for the family (its loss and mean: _loss_and_mean)
    unit_deviance: Callable  # of (y, mean)
    link: Callable
    curvature: float | None  # bound on the loss's second derivative in the drive (None: unbounded)


FAMILIES = {
    "bernoulli": Family("bernoulli", expit, 0, _bernoulli_deviance, logit, 0.25),
    "gaussian": Family("gaussian", lambda eta: eta, 1, lambda y, mean: (y - mean) ** 2, lambda m: m, 1.0),
    "poisson": Family("poisson", np.exp, 2, _poisson_deviance, np.log, None),
}


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------------------------
# The solver: FISTA on  mean loss + α [ρ Σ_k ω_k ‖w_k‖ + (1 − ρ)/2 Σ_j r_j w_j²]


class _Penalty:
    """Which coefficients form each group-lasso group, and the weights of both penalty parts."""

    def __init__(self, labels, group_weights, ridge_weights, l1_ratio: float):
        self.labels = np.asarray(labels)  # (p,) group of each coefficient; -1: ridge part only
        self.grouped = np.flatnonzero(self.labels >= 0)
        self.group_of = self.labels[self.grouped]
        self.group_weights = np.asarray(group_weights, dtype=float)
        self.ridge_weights = np.asarray(ridge_weights, dtype=float)
        self.l1_ratio = float(l1_ratio)

    def norms(self, coef):
        return _group_norms(np.asarray(coef, dtype=float), self.grouped, self.group_of, len(self.group_weights))


@dataclass
class _Solution:
    intercept: float
    coef: np.ndarray
    objective: float = np.inf
    n_iter: int = 0
    converged: bool = False
    lipschitz: float = 1.0  # the last step size's inverse: the next warm start begins there


def _problem_at(y, family: Family, penalty: _Penalty, alpha: float, start: _Solution | None, n_coef: int, tol: float):
    """What both solvers start from: the ridge weights and group thresholds at ``alpha``, the start
    (the intercept-only model when None) and the absolute tolerance ``tol × std(y)``."""
    ridge = alpha * (1.0 - penalty.l1_ratio) * penalty.ridge_weights
    thresholds = alpha * penalty.l1_ratio * penalty.group_weights
    if start is None:
        start = _Solution(float(family.link(y.mean())), np.zeros(n_coef))
    return ridge, thresholds, start, tol * max(float(y.std()), 1e-12)


def _solve(design, y, family: Family, penalty: _Penalty, alpha: float, start: _Solution | None, *, gram_norm: float, tol: float, max_iter: int) -> _Solution:
    """Minimise the penalised objective from ``start`` (or the intercept-only model).

    ``gram_norm`` is the largest eigenvalue of [1 design]ᵀ[1 design] / n, so where the family's
    curvature is bounded (bernoulli, gaussian) the step 1 / L with L = curvature · gram_norm +
    ridge is safe and no loss needs evaluating; otherwise
    (poisson) the step is found by backtracking. Converged when the gradient mapping (the
    proximal step divided by the step size, zero exactly at the optimum) is below
    ``tol × std(y)`` in every coordinate. The iterations run compiled (:func:`_fista`): each is a
    few products with a design of tens of columns, where interpreted numpy would spend most of
    its time dispatching.
    """
    ridge, thresholds, start, tolerance = _problem_at(y, family, penalty, alpha, start, design.shape[1], tol)
    backtrack = family.curvature is None
    lipschitz = start.lipschitz if backtrack else family.curvature * gram_norm + ridge.max(initial=0.0)
    intercept, coef, n_iter, converged, lipschitz, objective = _fista(
        design, y, family.code, penalty.grouped, penalty.group_of, ridge, thresholds,
        float(start.intercept), np.array(start.coef, dtype=float), float(lipschitz), backtrack, tolerance, max_iter,
    )
    return _Solution(float(intercept), coef, float(objective), int(n_iter), bool(converged), float(lipschitz))


# A Newton step costs one weighted Gram of the design (n·p²) and saves most of the 20–50 gradient
# passes (n·p each) FISTA takes per solve. Measured on the GLM benchmark (10,000 samples): the
# separable steps' 15–23 columns solve 3× faster by Newton, the full grid's 123 columns 1.3×
# slower.
NEWTON_MAX_COLUMNS = 64
NEWTON_DAMPING = 1e-8  # added to the Hessian's diagonal, in whitened units (a column's variance is 1)


def _solve_newton(design, transform, y, family: Family, penalty: _Penalty, alpha: float, start: _Solution | None, *, tol: float, max_iter: int) -> _Solution:
    """The same minimisation as :func:`_solve`, by proximal Newton: for narrow designs.

    The coefficients are whitened (Z = ``design`` · ``transform``); Z itself is never formed.
    Each iteration forms the Hessian Hz = [1 Z]ᵀ W [1 Z] / n (+ ridge) at the current drive (one
    weighted Gram of the design, mapped through the transform), minimises the quadratic model
    plus the group penalty exactly (compiled FISTA in p + 1 dimensions, :func:`_quadratic_step`:
    no pass over the samples) and backtracks along the step until the objective falls enough
    (Armijo). The stopping rule is :func:`_solve`'s: the gradient mapping at the iterate, with the
    step 1 / λ_max(Hz), below ``tol × std(y)`` in every coordinate. Near the optimum each
    iteration multiplies the number of correct digits, so a warm-started solve takes two or three
    iterations, each about as costly as a dozen gradient passes.
    """
    ridge, thresholds, start, tolerance = _problem_at(y, family, penalty, alpha, start, transform.shape[1], tol)
    theta = np.concatenate([[start.intercept], start.coef]).astype(float)
    theta, objective, n_iter, converged, lipschitz = _newton(
        np.ascontiguousarray(design, dtype=float), np.ascontiguousarray(transform), y, family.code, ridge, penalty.grouped, penalty.group_of, thresholds, theta, tolerance, max_iter
    )
    return _Solution(float(theta[0]), theta[1:].copy(), float(objective), int(n_iter), bool(converged), float(lipschitz if lipschitz > 0 else start.lipschitz))


@numba.njit(nogil=True, cache=True)
def _newton(design, transform, y, code, ridge, grouped, group_of, thresholds, theta, tolerance, max_iter):
    """:func:`_solve_newton`'s iterations, compiled and without the GIL (cross-validation folds run
    on threads). Returns (θ, objective, iterations, converged, last λ_max(Hz), or 0 if none)."""
    n, p = design.shape
    augmented_transform = np.zeros((p + 1, transform.shape[1] + 1))
    augmented_transform[0, 0] = 1.0
    augmented_transform[1:, 1:] = transform
    none = np.empty(0)
    eta, loss, mean, weight = _evaluate(code, y, design @ (transform @ theta[1:]) + theta[0], none, 0.0)
    objective = loss + _penalty_value(theta, ridge, grouped, group_of, thresholds)
    weighted = np.empty((n, p + 1))
    lipschitz, converged, iteration = 0.0, False, 0
    for iteration in range(1, max_iter + 1):
        residual = mean - y
        gradient = np.empty(len(theta))
        gradient[0] = residual.sum() / n
        gradient[1:] = transform.T @ (design.T @ residual) / n + ridge * theta[1:]
        if lipschitz > 0 and _gradient_mapping(theta, gradient, grouped, group_of, thresholds, lipschitz) <= tolerance:
            converged = True
            break
        for i in range(n):
            scale = math.sqrt(weight[i] / n)
            weighted[i, 0] = scale
            for j in range(p):
                weighted[i, j + 1] = scale * design[i, j]
        hessian = augmented_transform.T @ (weighted.T @ weighted) @ augmented_transform
        # Damping keeps the model bounded where the weights vanish (separable classes, saturated
        # drives); any positive-definite model has the same fixed point, so the optimum is unchanged.
        for j in range(len(theta)):
            hessian[j, j] += NEWTON_DAMPING + (ridge[j - 1] if j else 0.0)
        lipschitz = np.linalg.eigvalsh(hessian)[-1]
        if iteration == 1 and _gradient_mapping(theta, gradient, grouped, group_of, thresholds, lipschitz) <= tolerance:
            converged = True
            break
        target = _quadratic_step(hessian, gradient, theta, grouped, group_of, thresholds, lipschitz, 0.1 * tolerance, 100 * max_iter)
        step = target - theta
        step_drive = design @ (transform @ step[1:]) + step[0]
        # The linearised decrease ∇ᵀd + P(θ + d) − P(θ) of the non-smooth part (the ridge is in ∇).
        ridge_change = 0.5 * np.dot(ridge * step[1:], step[1:] + 2.0 * theta[1:])
        decrease = np.dot(gradient, step) + _penalty_value(target, ridge, grouped, group_of, thresholds) - _penalty_value(theta, ridge, grouped, group_of, thresholds) - ridge_change
        length, accepted = 1.0, False
        while length >= 1e-10:  # Armijo backtracking: accept once the objective falls by a share of the linearised decrease
            moved, loss, moved_mean, moved_weight = _evaluate(code, y, eta, step_drive, length)
            candidate = loss + _penalty_value(theta + length * step, ridge, grouped, group_of, thresholds)
            if candidate <= objective + 1e-4 * length * decrease + 1e-13 * abs(objective):
                accepted = True
                break
            length *= 0.5
        if not accepted:  # no step lowers the objective: as far as this precision goes (not converged)
            break
        theta = theta + length * step
        eta, objective, mean, weight = moved, candidate, moved_mean, moved_weight
    return theta, objective, iteration, converged, lipschitz


@numba.njit(nogil=True, cache=True)
def _evaluate(code, y, eta, step_drive, length):
    """At the drives η + length · step_drive (η alone when step_drive is empty): the drives, the
    mean loss of family ``code`` (inf on overflow), the mean and the IRLS weight, in one pass."""
    n = len(y)
    moved, mean, weight = np.empty(n), np.empty(n), np.empty(n)
    total = 0.0
    for i in range(n):
        drive = eta[i] + length * step_drive[i] if len(step_drive) else eta[i]
        moved[i] = drive
        term, mean[i] = _loss_and_mean(code, y[i], drive)
        total += term
        # dμ/dη: μ(1 − μ), 1 and μ for the canonical links
        weight[i] = mean[i] * (1.0 - mean[i]) if code == 0 else (1.0 if code == 1 else mean[i])
    loss = total / n
    return moved, (loss if np.isfinite(loss) else np.inf), mean, weight


@numba.njit(nogil=True, cache=True)
def _penalty_value(theta, ridge, grouped, group_of, thresholds):
    """½ Σ ridge w² + Σ_k thresholds_k ‖w_k‖ at (intercept, coef) = ``theta``."""
    coef = theta[1:]
    return 0.5 * np.dot(ridge * coef, coef) + np.dot(thresholds, _group_norms(coef, grouped, group_of, len(thresholds)))


@numba.njit(nogil=True, cache=True)
def _shrink(coef, grouped, group_of, thresholds):
    """Block soft-thresholding in place: the proximal operator of Σ_k thresholds_k ‖coef_k‖."""
    norms = _group_norms(coef, grouped, group_of, len(thresholds))
    for k in range(len(grouped)):
        g = group_of[k]
        coef[grouped[k]] *= max(0.0, 1.0 - thresholds[g] / max(norms[g], 1e-300))


@numba.njit(nogil=True, cache=True)
def _gradient_mapping(theta, gradient, grouped, group_of, thresholds, lipschitz):
    """max |L (θ − prox(θ − ∇/L))|: zero exactly at the optimum."""
    coef = np.empty(len(theta) - 1)
    for j in range(len(coef)):
        coef[j] = theta[j + 1] - gradient[j + 1] / lipschitz
    _shrink(coef, grouped, group_of, thresholds / lipschitz)
    largest = abs(gradient[0])  # the intercept's step is the plain gradient step
    for j in range(len(coef)):
        largest = max(largest, lipschitz * abs(coef[j] - theta[j + 1]))
    return largest


@numba.njit(nogil=True, cache=True)
def _quadratic_step(hessian, gradient, theta, grouped, group_of, thresholds, lipschitz, tolerance, max_iter):
    """argmin_u ∇ᵀ(u − θ) + ½ (u − θ)ᵀ H (u − θ) + Σ_k thresholds_k ‖u_k‖ (u[0], the intercept,
    unpenalised): FISTA with adaptive restart in p + 1 dimensions, from the proximal gradient point.
    Plain loops: at these sizes they run as fast as BLAS calls and compile in a fraction of the time."""
    size, scaled = len(theta), thresholds / lipschitz
    current, new, extrapolated = np.empty(size), np.empty(size), np.empty(size)
    for i in range(size):
        current[i] = theta[i] - gradient[i] / lipschitz
    _shrink(current[1:], grouped, group_of, scaled)
    extrapolated[:] = current
    momentum = 1.0
    for _ in range(max_iter):
        for i in range(size):
            model_gradient = gradient[i]
            for k in range(size):
                model_gradient += hessian[i, k] * (extrapolated[k] - theta[k])
            new[i] = extrapolated[i] - model_gradient / lipschitz
        _shrink(new[1:], grouped, group_of, scaled)
        largest, uphill = 0.0, 0.0
        for i in range(size):
            largest = max(largest, abs(new[i] - extrapolated[i]))
            uphill += (new[i] - extrapolated[i]) * (new[i] - current[i])
        if lipschitz * largest <= tolerance:
            return new.copy()
        if uphill < 0:
            momentum = 1.0
        next_momentum = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum**2))
        for i in range(size):
            extrapolated[i] = new[i] + (momentum - 1.0) / next_momentum * (new[i] - current[i])
            current[i] = new[i]
        momentum = next_momentum
    return current


@numba.njit(nogil=True, cache=True)
def _loss_and_mean(code, y, drive):
    """One sample's negative log-likelihood (up to a constant) and mean under family ``code``
    (0 bernoulli, 1 gaussian, 2 poisson): every solver's loss and inverse link come from here."""
    if code == 0:  # log(1 + e^η) − yη and the logistic function, without overflow on either side
        e = math.exp(-abs(drive))
        return max(drive, 0.0) + math.log1p(e) - y * drive, (1.0 / (1.0 + e) if drive >= 0 else e / (1.0 + e))
    if code == 1:
        return 0.5 * (y - drive) ** 2, drive
    mean = math.exp(drive)
    return mean - y * drive, mean


@numba.njit(nogil=True, cache=True)
def _mean_of(code, eta):
    """The inverse link of family ``code`` at every drive."""
    out = np.empty_like(eta)
    for i in range(len(eta)):
        out[i] = _loss_and_mean(code, 0.0, eta[i])[1]
    return out


@numba.njit(nogil=True, cache=True)
def _mean_loss(code, y, eta):
    """Mean negative log-likelihood of family ``code`` at the drives ``eta``, up to a constant."""
    total = 0.0
    for i in range(len(y)):
        total += _loss_and_mean(code, y[i], eta[i])[0]
    return total / len(y)


@numba.njit(nogil=True, cache=True)
def _group_norms(coef, grouped, group_of, n_groups):
    norms = np.zeros(n_groups)
    for k in range(len(grouped)):
        norms[group_of[k]] += coef[grouped[k]] ** 2
    return np.sqrt(norms)


@numba.njit(nogil=True, cache=True)
def _fista(design, y, code, grouped, group_of, ridge, thresholds, b, w, lipschitz, backtrack, tolerance, max_iter):
    """FISTA with adaptive restart on mean loss + ridge + Σ_k thresholds_k ‖w_k‖: see :func:`_solve`.

    Returns (intercept, coef, iterations, converged, last lipschitz, objective).
    """
    n, n_groups = len(y), len(thresholds)

    def smooth(coef, eta):
        return _mean_loss(code, y, eta) + 0.5 * np.dot(ridge * coef, coef)

    eta = design @ w + b
    yb, yw, eta_y, momentum = b, w.copy(), eta.copy(), 1.0
    value_y = 0.0
    converged, iteration = False, 0
    new_b, new_w, new_eta = b, w, eta
    for iteration in range(1, max_iter + 1):
        if backtrack:
            value_y = smooth(yw, eta_y)
            if not np.isfinite(value_y):  # an extrapolated point overflowed: drop the momentum
                yb, yw, eta_y, momentum = b, w.copy(), eta.copy(), 1.0
                value_y = smooth(yw, eta_y)
        residual = _mean_of(code, eta_y) - y
        grad_b = residual.sum() / n
        grad_w = design.T @ residual / n + ridge * yw
        while True:
            new_b = yb - grad_b / lipschitz
            new_w = yw - grad_w / lipschitz
            _shrink(new_w, grouped, group_of, thresholds / lipschitz)
            new_eta = design @ new_w + new_b
            step_b, step_w = new_b - yb, new_w - yw
            if not backtrack:
                break
            bound = value_y + grad_b * step_b + np.dot(grad_w, step_w) + 0.5 * lipschitz * (step_b**2 + np.dot(step_w, step_w))
            if smooth(new_w, new_eta) <= bound + 1e-12 * abs(value_y) or lipschitz > 1e15:
                break
            lipschitz *= 2.0
        largest = abs(step_b)
        for j in range(len(step_w)):
            largest = max(largest, abs(step_w[j]))
        if lipschitz * largest <= tolerance:
            b, w, eta, converged = new_b, new_w, new_eta, True
            break
        # Adaptive restart (O'Donoghue & Candès): momentum that points uphill is dropped.
        if step_b * (new_b - b) + np.dot(step_w, new_w - w) < 0:
            momentum = 1.0
        next_momentum = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum**2))
        beta = (momentum - 1.0) / next_momentum
        yb, yw = new_b + beta * (new_b - b), new_w + beta * (new_w - w)
        eta_y = new_eta + beta * (new_eta - eta)
        b, w, eta, momentum = new_b, new_w, new_eta, next_momentum
        if backtrack:
            lipschitz *= 0.9  # let the step grow again where the curvature is lower
    objective = smooth(w, eta) + np.dot(thresholds, _group_norms(w, grouped, group_of, n_groups))
    return b, w, iteration, converged, lipschitz, objective


# ----------------------------------------------------------------------------------------------
# Problems: a design, a target and a penalty structure, fitted along a path of α


class _Problem:
    target: np.ndarray
    family: Family

    def mean_deviance(self, state) -> float:
        return float(self.family.unit_deviance(self.target, self.family.mean(self.drive(state))).mean())


class _LinearProblem(_Problem):
    """A penalised GLM on a 2-D design whose column blocks are whitened.

    Block k (the columns labelled k) is multiplied by T_k = V Λ^(−1/2) from the eigendecomposition
    of its second-moment matrix, so its whitened columns are uncorrelated with unit variance
    (directions of zero variance are dropped). A group lasso on whitened coefficients then
    penalises ‖Z_k β_k‖ / √n, the RMS of block k's contribution to the drive: it does not depend
    on how the block is parametrised, and the solvers' steps are well conditioned. Label −1 marks
    the block outside the group lasso (history), which is whitened and gets the ridge part only.

    Coefficients live in whitened coordinates; the design is kept as given. Newton's method
    (narrow designs) maps its few products through the dense block-diagonal ``transform``; FISTA
    (wide designs, many cheap steps) multiplies by the whitened design Z, formed once.
    """

    def __init__(self, design, target, family: Family, penalty: _Penalty, blocks, tol: float, max_iter: int):
        self.design, self.target, self.family, self.penalty = design, target, family, penalty
        self.blocks = blocks  # [(original columns, T_k, T_k⁺ᵀ)]
        self.tol, self.max_iter = tol, max_iter

    @classmethod
    def build(cls, design, target, family: Family, labels, group_weights, l1_ratio: float, *, tol: float, max_iter: int, gram=None) -> "_LinearProblem":
        """The problem on ``design`` (sample, column) whose columns labelled alike form a block;
        ``gram`` = XᵀX / n where the caller has it cheaper than a pass over the design."""
        gram = design.T @ design / len(design) if gram is None else gram
        blocks, white_labels = [], []
        for label in np.unique(labels):
            original = np.flatnonzero(labels == label)
            variances, directions = np.linalg.eigh(gram[np.ix_(original, original)])
            keep = variances > max(variances.max(initial=0.0), 1e-300) * 1e-10
            directions, scales = directions[:, keep], np.sqrt(variances[keep])
            blocks.append((original, directions / scales, directions * scales))
            white_labels.append(np.full(keep.sum(), label))
        white_labels = np.concatenate(white_labels)
        penalty = _Penalty(white_labels, group_weights, np.ones(len(white_labels)), l1_ratio)
        return cls(design, target, family, penalty, blocks, tol, max_iter)

    @cached_property
    def transform(self) -> np.ndarray:
        """The dense (column × whitened column) map: Z = X · transform."""
        transform = np.zeros((self.design.shape[1], len(self.penalty.labels)))
        start = 0
        for original, block, _ in self.blocks:
            transform[original, start : start + block.shape[1]] = block
            start += block.shape[1]
        return transform

    @cached_property
    def whitened(self) -> np.ndarray:
        whitened = np.empty((len(self.design), len(self.penalty.labels)), order="F")
        start = 0
        for original, block, _ in self.blocks:
            whitened[:, start : start + block.shape[1]] = self.design[:, original] @ block
            start += block.shape[1]
        return whitened

    def to_original(self, white_coef) -> np.ndarray:
        coef = np.zeros(self.design.shape[1])
        start = 0
        for original, transform, _ in self.blocks:
            coef[original] = transform @ white_coef[start : start + transform.shape[1]]
            start += transform.shape[1]
        return coef

    def to_whitened(self, coef) -> np.ndarray:
        return np.concatenate([inverse.T @ coef[original] for original, _, inverse in self.blocks])

    def rows(self, index) -> "_LinearProblem":
        return _LinearProblem(np.ascontiguousarray(self.design[index]), self.target[index], self.family, self.penalty, self.blocks, self.tol, self.max_iter)

    def alpha_max(self) -> float:
        """The smallest α at which every group is zero (with only the intercept fitted)."""
        original_gradient = self.design.T @ (self.target.mean() - self.target) / len(self.target)
        gradient = np.concatenate([block.T @ original_gradient[original] for original, block, _ in self.blocks])
        ratio = max(self.penalty.l1_ratio, 1e-3)
        return float(max((self.penalty.norms(gradient) / (ratio * self.penalty.group_weights)).max(), 1e-12))

    @cached_property
    def gram_norm(self) -> float:
        """Largest eigenvalue of [1 Z]ᵀ[1 Z] / n: with the family's curvature, a safe step size."""
        n = len(self.target)
        augmented = np.empty((self.whitened.shape[1] + 1,) * 2)
        augmented[0, 0] = 1.0
        augmented[0, 1:] = augmented[1:, 0] = self.whitened.mean(axis=0)
        augmented[1:, 1:] = self.whitened.T @ self.whitened / n
        return float(np.linalg.eigvalsh(augmented)[-1])

    def fit(self, alpha: float, warm: _Solution | None) -> _Solution:
        if self.design.shape[1] <= NEWTON_MAX_COLUMNS:
            return _solve_newton(self.design, self.transform, self.target, self.family, self.penalty, alpha, warm, tol=self.tol, max_iter=self.max_iter)
        gram_norm = self.gram_norm if self.family.curvature is not None else 1.0
        return _solve(self.whitened, self.target, self.family, self.penalty, alpha, warm, gram_norm=gram_norm, tol=self.tol, max_iter=self.max_iter)

    def drive(self, solution: _Solution) -> np.ndarray:
        return solution.intercept + self.design @ self.to_original(solution.coef)


@dataclass
class _FilterState:
    intercept: float
    filters: np.ndarray  # (group, spatial coef, temporal coef)
    history: np.ndarray  # (history_lag,)
    n_iter: int
    converged: bool
    solutions: list  # the last solver solutions (full grid: one; separable: the s and t steps), to warm-start from
    spatial: np.ndarray | None = None  # separable: (group, spatial coef)
    temporal: np.ndarray | None = None  # separable: (group, temporal coef), unit norm


class _FilterProblem(_Problem):
    """Grouped spatial × temporal filters (+ history) in orthonormal basis coordinates.

    ``features`` (sample, group, spatial coef, temporal coef) and ``history`` are centred;
    ``temporal_grid`` (lag × temporal coef) maps temporal coefficients to the grid for the sign
    convention. Each group's penalty weight is ω_g = √(spatial × temporal coefficients) in the
    full-grid fit and in both separable steps, so they all minimise one objective.

    The separable fit follows the α path: each α starts from the previous α's s and t, and a group
    that is still zero gets as its t the direction in which it would enter, the top right singular
    vector of the loss gradient with respect to its full-grid filter.
    """

    def __init__(self, source, shape, target, family, l1_ratio, temporal_grid, separable, *, tol, max_iter, max_alternations):
        self.source, self.shape = source, shape  # source: the features (flattened to shape's size) then history, per sample
        self.target, self.family = target, family
        self.l1_ratio, self.temporal_grid, self.separable = l1_ratio, temporal_grid, separable
        self.tol, self.max_iter, self.max_alternations = tol, max_iter, max_alternations
        n_groups, n_spatial, n_temporal = shape
        self.group_weights = np.full(n_groups, np.sqrt(n_spatial * n_temporal))

    @classmethod
    def from_arrays(cls, features, history, target, family, l1_ratio, temporal_grid, separable, **settings) -> "_FilterProblem":
        source = np.concatenate([features.reshape(len(target), -1), history], axis=1)
        return cls(source, features.shape[1:], target, family, l1_ratio, temporal_grid, separable, **settings)

    @property
    def _n_filter(self) -> int:
        return int(np.prod(self.shape))

    @property
    def _n_history(self) -> int:
        return self.source.shape[1] - self._n_filter

    @cached_property
    def gram(self) -> np.ndarray:
        """SᵀS / n of the source: every step's whitening comes from it, without a pass over the samples."""
        return self.source.T @ self.source / len(self.target)

    @cached_property
    def full(self) -> _LinearProblem:
        return self._step_problem()

    def _step_problem(self, weights=None, over_spatial: bool = False) -> _LinearProblem:
        """The linear problem with one coefficient block per group (+ history): with ``weights``
        (group, coef), each group's features summed against them over the spatial axis
        (``over_spatial``: the temporal step, weights = s) or the temporal one (the spatial
        step, weights = t); without, the features themselves (the full grid)."""
        n_groups, n_spatial, n_temporal = self.shape
        n_history = self._n_history
        if weights is None:
            design, gram, per_group = self.source, self.gram, n_spatial * n_temporal
        else:
            per_group = n_temporal if over_spatial else n_spatial
            design = _contract_features(self.source, n_groups, n_spatial, n_temporal, weights, over_spatial)
            # The contracted design is the source times a sparse map, so its Gram is the source's mapped.
            combination = _contraction_map(n_groups, n_spatial, n_temporal, n_history, weights, over_spatial)
            gram = combination.T @ self.gram @ combination
        labels = np.concatenate([np.repeat(np.arange(n_groups), per_group), np.full(n_history, -1)])
        return _LinearProblem.build(design, self.target, self.family, labels, self.group_weights, self.l1_ratio, tol=self.tol, max_iter=self.max_iter, gram=gram)

    def rows(self, index) -> "_FilterProblem":
        settings = dict(tol=self.tol, max_iter=self.max_iter, max_alternations=self.max_alternations)
        return _FilterProblem(self.source[index], self.shape, self.target[index], self.family, self.l1_ratio, self.temporal_grid, self.separable, **settings)

    def alpha_max(self) -> float:
        return self.full.alpha_max()

    def _split(self, coef, per_group: int):
        n_groups = self.shape[0]
        return coef[: n_groups * per_group].reshape(n_groups, per_group), coef[n_groups * per_group :]

    def fit(self, alpha: float, warm: _FilterState | None) -> _FilterState:
        if self.separable:
            return self._fit_separable(alpha, warm)
        start = None
        if warm is not None:  # from the warm state's filters: it may come from a problem on other rows, whitened otherwise
            start = _Solution(warm.intercept, self.full.to_whitened(np.concatenate([warm.filters.ravel(), warm.history])), lipschitz=warm.solutions[0].lipschitz)
        solution = self.full.fit(alpha, start)
        filters, history = self._split(self.full.to_original(solution.coef), self._n_filter // self.shape[0])
        return _FilterState(solution.intercept, filters.reshape(self.shape), history, solution.n_iter, solution.converged, [solution])

    def _fit_separable(self, alpha: float, warm: _FilterState | None) -> _FilterState:
        """Exact convex steps over s (t fixed) and t (s fixed) until the objective settles."""
        n_groups, n_spatial, n_temporal = self.shape
        n_history = self._n_history
        if warm is None:
            intercept = float(self.family.link(self.target.mean()))
            spatial, temporal, history = np.zeros((n_groups, n_spatial)), np.zeros((n_groups, n_temporal)), np.zeros(n_history)
            steps = [_Solution(intercept, np.zeros(0))] * 2
        else:
            intercept, spatial, temporal, history, steps = warm.intercept, warm.spatial, warm.temporal.copy(), warm.history, warm.solutions
        absent = ~spatial.any(axis=1)
        if absent.any():
            state = _FilterState(intercept, spatial[:, :, None] * temporal[:, None, :], history, 0, False, steps)
            residual = self.family.mean(self.drive(state)) - self.target
            gradient = (residual @ self.source[:, : self._n_filter] / len(residual)).reshape(self.shape)
            temporal[absent] = _rank_one(gradient[absent], self.temporal_grid)[1]
        previous, n_iter, converged = np.inf, 0, False
        for _ in range(self.max_alternations):
            # With t fixed, each group's drive contribution is linear in s_g: a standardised group lasso ...
            problem = self._step_problem(temporal, over_spatial=False)
            start = _Solution(intercept, problem.to_whitened(np.concatenate([spatial.ravel(), history])), lipschitz=steps[0].lipschitz)
            spatial_step = problem.fit(alpha, start)
            spatial, history = self._split(problem.to_original(spatial_step.coef), n_spatial)
            # ... and likewise in t_g with s fixed.
            problem = self._step_problem(spatial, over_spatial=True)
            start = _Solution(spatial_step.intercept, problem.to_whitened(np.concatenate([temporal.ravel(), history])), lipschitz=steps[1].lipschitz)
            temporal_step = problem.fit(alpha, start)
            new_temporal, history = self._split(problem.to_original(temporal_step.coef), n_temporal)
            spatial, temporal = _normalise(spatial, new_temporal, temporal, self.temporal_grid)
            intercept, steps = temporal_step.intercept, [spatial_step, temporal_step]
            n_iter += spatial_step.n_iter + temporal_step.n_iter
            if previous - temporal_step.objective <= self.tol * max(abs(temporal_step.objective), 1e-12):
                converged = spatial_step.converged and temporal_step.converged
                break
            previous = temporal_step.objective
        filters = spatial[:, :, None] * temporal[:, None, :]
        return _FilterState(intercept, filters, history, n_iter, converged, steps, spatial, temporal)

    def drive(self, state: _FilterState) -> np.ndarray:
        return state.intercept + self.source @ np.concatenate([state.filters.ravel(), state.history])


@numba.njit(nogil=True, cache=True)
def _contract_features(source, n_groups, n_spatial, n_temporal, weights, over_spatial):
    """``source @ _contraction_map(...)`` in one pass over the source, without the map's zeros:
    each group's features summed against ``weights`` (group, coef) over the spatial axis
    (``over_spatial``) or the temporal one, then the history columns as they are."""
    n, width = source.shape[0], n_spatial * n_temporal
    kept = n_temporal if over_spatial else n_spatial
    n_history = source.shape[1] - n_groups * width
    out = np.empty((n, n_groups * kept + n_history))
    sums = np.empty(kept)
    for i in range(n):
        row, out_row = source[i], out[i]
        for g in range(n_groups):
            base = g * width
            if over_spatial:  # sums[c] = Σ_r s[g, r] · features[g, r, c]
                for c in range(n_temporal):
                    sums[c] = 0.0
                for r in range(n_spatial):
                    weight = weights[g, r]
                    for c in range(n_temporal):
                        sums[c] += weight * row[base + r * n_temporal + c]
            else:  # sums[r] = Σ_c features[g, r, c] · t[g, c]
                for r in range(n_spatial):
                    total = 0.0
                    for c in range(n_temporal):
                        total += row[base + r * n_temporal + c] * weights[g, c]
                    sums[r] = total
            for k in range(kept):
                out_row[g * kept + k] = sums[k]
        for h in range(n_history):
            out_row[n_groups * kept + h] = row[n_groups * width + h]
    return out


@numba.njit(nogil=True, cache=True)
def _contraction_map(n_groups, n_spatial, n_temporal, n_history, weights, over_spatial):
    """The (source column × design column) map of :func:`_contract_features`."""
    width = n_spatial * n_temporal
    kept = n_temporal if over_spatial else n_spatial
    combination = np.zeros((n_groups * width + n_history, n_groups * kept + n_history))
    for g in range(n_groups):
        for r in range(n_spatial):
            for c in range(n_temporal):
                if over_spatial:
                    combination[g * width + r * n_temporal + c, g * kept + c] = weights[g, r]
                else:
                    combination[g * width + r * n_temporal + c, g * kept + r] = weights[g, c]
    for h in range(n_history):
        combination[n_groups * width + h, n_groups * kept + h] = 1.0
    return combination


def _sign_convention(temporal_on_grid):
    """+1 or −1 per group so that Σ_l t_g(l) ≥ 0 (or, summing to zero, its largest value is positive)."""
    sums = temporal_on_grid.sum(axis=1)
    peaks = np.take_along_axis(temporal_on_grid, np.abs(temporal_on_grid).argmax(axis=1)[:, None], axis=1)[:, 0]
    tie = np.abs(sums) <= 1e-12 * np.abs(temporal_on_grid).sum(axis=1)
    return np.where(np.where(tie, peaks, sums) < 0, -1.0, 1.0)


def _rank_one(filters, temporal_grid):
    """Leading singular pair per group: s = σ₁u₁, t = v₁ (‖t‖ = 1, signed by convention); σ₁²/Σσ²."""
    left, singular, right = np.linalg.svd(filters, full_matrices=False)
    spatial, temporal = left[:, :, 0] * singular[:, :1], right[:, 0, :]
    sign = _sign_convention(temporal @ temporal_grid.T)
    energy = (singular**2).sum(axis=1)
    separability = np.divide(singular[:, 0] ** 2, energy, out=np.ones_like(energy), where=energy > 0)
    return spatial * sign[:, None], temporal * sign[:, None], separability


def _normalise(spatial, temporal, previous_temporal, temporal_grid):
    """Move the scale of t into s; a group whose t was zeroed keeps its previous direction."""
    norms = np.linalg.norm(temporal, axis=1)
    alive = norms > 0
    temporal = np.where(alive[:, None], temporal / np.where(alive, norms, 1.0)[:, None], previous_temporal)
    spatial = spatial * np.where(alive, norms, 0.0)[:, None]
    sign = _sign_convention(temporal @ temporal_grid.T)
    return spatial * sign[:, None], temporal * sign[:, None]


# ----------------------------------------------------------------------------------------------
# Cross-validation over the penalty path, with folds that never split a block


def block_folds(blocks, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` (train, test) index pairs; all samples of a block fall in the same test fold."""
    blocks = np.asarray(blocks)
    n_blocks = len(np.unique(blocks))
    if n_blocks < n_folds:
        raise ReduceError(f"{n_folds}-fold cross-validation needs at least {n_folds} blocks, found {n_blocks}; add blocks or lower cv", field="block")
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(blocks)), groups=blocks))


def split_by_block(blocks, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sample indices holding out about ``test_fraction`` of the blocks."""
    blocks = np.asarray(blocks)
    n_blocks = len(np.unique(blocks))
    if n_blocks < 2:
        raise ReduceError(f"a train/test split needs at least 2 blocks, found {n_blocks}", field="block")
    n_test = min(max(1, round(test_fraction * n_blocks)), n_blocks - 1)
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_test, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(blocks)), groups=blocks))
    return np.sort(train), np.sort(test)


def _cv_results(alphas, fold_deviance, converged) -> dict:
    """``cv_results_``: the α path, held-out mean deviance per (α, fold), its mean and spread."""
    n_folds = fold_deviance.shape[1]
    return {
        "alphas": np.asarray(alphas),
        "fold_deviance": fold_deviance,
        "mean_deviance": fold_deviance.mean(axis=1),
        "std_deviance": fold_deviance.std(axis=1, ddof=1) if n_folds > 1 else np.zeros(len(alphas)),
        "converged": converged,
    }


def _choose_alpha(cv_results: dict, rule: str) -> float:
    """``min``: lowest mean held-out deviance; ``1se``: the largest α within one standard error of it."""
    mean, alphas = cv_results["mean_deviance"], cv_results["alphas"]
    best = int(np.argmin(mean))
    if rule == "min":
        return float(alphas[best])
    n_folds = cv_results["fold_deviance"].shape[1]
    limit = mean[best] + cv_results["std_deviance"][best] / np.sqrt(n_folds)
    return float(alphas[np.flatnonzero(mean <= limit)].max())


def _fit_with_penalty_path(problem: _Problem, blocks, *, alpha, n_alphas, alpha_min_ratio, cv, alpha_rule, seed, n_jobs=None, start=None):
    """Fit at ``alpha`` (from ``start``), or choose α by block cross-validation.

    Choosing: the fit on all rows follows the α path down from α_max (each α warm-started from the
    previous), and each fold's fit at each α starts from the all-rows fit at that α, which is far
    closer to it than the fold's fit at the previous α (a fold holds 1 − 1/cv of the rows). A start
    only changes where the solver begins: each fold fit still minimises the fold's own objective.
    The fold fits are independent of each other, so they run on ``n_jobs`` threads (the solvers'
    products and compiled loops release the GIL) while the path goes on.
    Returns (the chosen state, α, cv_results or None, solver iterations of the path down to α).
    """
    if alpha is not None:
        state = problem.fit(float(alpha), start)
        return state, float(alpha), None, state.n_iter
    top = problem.alpha_max()
    alphas = np.geomspace(top, top * alpha_min_ratio, n_alphas)
    splits = [(problem.rows(train), problem.rows(test)) for train, test in block_folds(blocks, cv, seed)]

    def held_out_deviance(split, alpha, start):
        fit_on, held_out = split
        state = fit_on.fit(alpha, start)
        return held_out.mean_deviance(state), state.converged

    path, scores, state = [], [], start
    with _executor(n_jobs) as pool:
        for step in alphas:
            state = problem.fit(step, state)
            path.append(state)
            scores.append([pool.submit(held_out_deviance, split, step, state) for split in splits])
        results = np.array([[future.result() for future in row] for row in scores], dtype=float)
    cv_results = _cv_results(alphas, results[..., 0], results[..., 1].astype(bool))
    alpha = _choose_alpha(cv_results, alpha_rule)
    chosen = int(np.flatnonzero(alphas == alpha)[0])
    return path[chosen], float(alpha), cv_results, sum(state.n_iter for state in path[: chosen + 1])


class _InThisThread:
    """The executor for one job at a time: each call runs when submitted, in the caller's thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    @staticmethod
    def submit(function, *args) -> Future:
        future = Future()
        future.set_result(function(*args))
        return future


def _executor(n_jobs):
    workers = effective_n_jobs(n_jobs)
    return _InThisThread() if workers == 1 else ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reduce-cv")


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # inspecting the loaded libraries is slow: once per process


def _one_blas_thread():
    """The solver's products are small: one BLAS thread is fastest, and kind to a shared machine."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _warn_if_not_converged(estimator, converged: bool) -> None:
    if not converged:
        warnings.warn(
            f"{type(estimator).__name__} did not converge (tol={estimator.tol}, max_iter={estimator.max_iter}); "
            "its coefficients and metrics are not reliable",
            ConvergenceWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# Data: the dataset contract, checked once, with ReduceErrors naming the variable at fault


def as_dataset(inputs, target=None, *, history=None, blocks=None, groups=None, distances=None, lags=None) -> xr.Dataset:
    """Arrays → the reduced model's dataset. Default coordinates: groups 0.., distances 1..D, lags 0..L−1."""
    inputs = np.asarray(inputs, dtype=float)
    if inputs.ndim != 4:
        raise ReduceError(f"inputs must be 4-D (sample, group, distance, lag), got shape {inputs.shape}", field="inputs")
    _, n_groups, n_distances, n_lags = inputs.shape
    coords = {
        "group": np.arange(n_groups) if groups is None else np.asarray(groups),
        "distance": np.arange(1, n_distances + 1) if distances is None else np.asarray(distances),
        "lag": np.arange(n_lags) if lags is None else np.asarray(lags),
    }
    dataset = xr.Dataset({"inputs": (INPUT_DIMS, inputs)}, coords=coords)
    if target is not None:
        dataset["target"] = ("sample", np.asarray(target, dtype=float).ravel())
    if history is not None:
        history = np.asarray(history, dtype=float)
        dataset["history"] = (HISTORY_DIMS, history.reshape(len(history), -1))
        dataset = dataset.assign_coords(history_lag=np.arange(1, dataset.sizes["history_lag"] + 1))
    if blocks is not None:
        dataset = dataset.assign_coords(block=("sample", np.asarray(blocks)))
    return dataset


def check_target(values, family: str, *, source=None, field: str = "target") -> None:
    """The target suits the family: two classes (bernoulli), counts (poisson), not constant."""
    values = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(values)):
        raise ReduceError(f"{np.size(values) - np.isfinite(values).sum()} values are NaN or infinite", file=source, field=field)
    if family == "bernoulli":
        if not np.all((values == 0) | (values == 1)):
            raise ReduceError("a bernoulli target must be 0/1 (or boolean)", file=source, field=field)
        if len(np.unique(values)) < 2:
            raise ReduceError(f"one class only (every value is {values.flat[0]:g}); a bernoulli fit needs both", file=source, field=field)
    if family == "poisson" and not np.all((values >= 0) & (values == np.round(values))):
        raise ReduceError("a poisson target must be non-negative integer counts", file=source, field=field)
    if np.ptp(values) == 0:
        raise ReduceError(f"the target is constant ({values.flat[0]:g}); there is nothing to predict", file=source, field=field)


def check_dataset(dataset: xr.Dataset, family: str | None = None, *, source=None, need_target: bool = True) -> xr.Dataset:
    """The dataset in canonical form (dims ordered, default coordinates), or a ReduceError.

    ``family`` also checks the target against the family; ``source`` names the file in errors.
    """
    expected = {"inputs": INPUT_DIMS, "target": ("sample",), "history": HISTORY_DIMS, "block": ("sample",)}
    required = ["inputs", "target"] if need_target else ["inputs"]
    for name in required:
        if name not in dataset.variables:
            raise ReduceError(f"missing variable {name!r} with dims {expected[name]}", file=source, field=name)
    for name, dims in expected.items():
        if name in dataset.variables and set(dataset[name].dims) != set(dims):
            raise ReduceError(f"dims are {dataset[name].dims}, expected {dims}", file=source, field=name)
    defaults = {"group": np.arange, "distance": lambda n: np.arange(1, n + 1), "lag": np.arange, "history_lag": lambda n: np.arange(1, n + 1)}
    dataset = dataset.assign_coords({dim: make(dataset.sizes[dim]) for dim, make in defaults.items() if dim in dataset.dims and dim not in dataset.coords})
    for dim in ("distance", "lag", "history_lag"):
        if dim in dataset.coords and not np.issubdtype(dataset[dim].dtype, np.number):
            raise ReduceError(f"coordinate must be numeric (bases are evaluated on it), got {dataset[dim].dtype}", file=source, field=dim)
    for name in ("inputs", "history", "target"):
        if name in dataset.variables and not (name == "target" and not need_target):
            values = dataset[name].values
            if not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
                raise ReduceError(f"values must be numeric, got {values.dtype}", file=source, field=name)
            bad = values.size - np.count_nonzero(np.isfinite(values))
            if bad:
                raise ReduceError(f"{bad} values are NaN or infinite", file=source, field=name)
    if need_target and family is not None:
        check_target(dataset["target"].values, family, source=source)
    ordered = {"inputs": INPUT_DIMS, "history": HISTORY_DIMS}
    return dataset.assign({name: dataset[name].transpose(*dims) for name, dims in ordered.items() if name in dataset.variables})


def sample_blocks(dataset: xr.Dataset) -> np.ndarray:
    """The block of each sample; without a ``block`` coordinate every sample is its own block."""
    return dataset["block"].values if "block" in dataset.variables else np.arange(dataset.sizes["sample"])


def _dataset(X, y=None) -> xr.Dataset:
    dataset = X if isinstance(X, xr.Dataset) else as_dataset(X)
    if y is not None:
        dataset = dataset.assign(target=("sample", np.asarray(y, dtype=float).ravel()))
    return dataset


def _aligned(array: xr.DataArray, reference: xr.DataArray) -> np.ndarray:
    """``array``'s values on ``reference``'s coordinates (same sets required, any order)."""
    for dim in reference.dims:
        ours, theirs = set(array[dim].values.tolist()), set(reference[dim].values.tolist())
        if ours != theirs:
            raise ReduceError(f"{dim} coordinates {sorted(ours, key=str)} differ from the model's {sorted(theirs, key=str)}", field=array.name)
    selected = array.sel({dim: reference[dim].values for dim in reference.dims})
    return np.ascontiguousarray(selected.transpose("sample", *reference.dims).values, dtype=float)


def _orthonormal(basis: Basis, points) -> np.ndarray:
    """An orthonormal basis (points × r) of the span of ``basis`` on the grid (rank-deficient columns dropped)."""
    left, singular, _ = np.linalg.svd(basis.evaluate(points), full_matrices=False)
    keep = singular > singular[0] * 1e-10 * max(left.shape)
    return left[:, keep]


def _project(inputs, spatial, temporal) -> np.ndarray:
    """(sample, group, distance, lag) → (sample, group, spatial coef, temporal coef)."""
    return np.matmul(np.swapaxes(inputs @ temporal, 2, 3), spatial).swapaxes(2, 3)


def _empirical_nonlinearity(drive, target, n_bins: int = 20):
    """Binned drive → mean target per bin, made monotone (isotonic): the seed's nonlinearity."""
    edges = np.quantile(drive, np.linspace(0, 1, n_bins + 1))
    bins = np.clip(np.searchsorted(edges, drive, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    used = counts > 0
    centres = np.bincount(bins, drive, minlength=n_bins)[used] / counts[used]
    rates = np.bincount(bins, target, minlength=n_bins)[used] / counts[used]
    monotone = IsotonicRegression(increasing=True).fit(centres, rates, sample_weight=counts[used])
    return centres, monotone.predict(centres)


def _nonlinearity_array(drive, rate) -> xr.DataArray:
    return xr.DataArray(rate, dims="knot", coords={"drive": ("knot", drive)}, name="nonlinearity")


# ----------------------------------------------------------------------------------------------
# Metrics


def _metrics(family: str, target, drive, mean) -> dict:
    """auroc (bernoulli, of the drive), r2 (gaussian) and deviance explained vs the target's mean."""
    unit_deviance = FAMILIES[family].unit_deviance
    null = unit_deviance(target, np.full_like(target, target.mean())).sum()
    metrics = {"deviance_explained": float(1.0 - unit_deviance(target, mean).sum() / null) if null > 0 else float("nan"), "n": int(len(target))}
    if family == "bernoulli":
        metrics["auroc"] = float(roc_auc_score(target, drive)) if len(np.unique(target)) == 2 else float("nan")
    if family == "gaussian":
        metrics["r2"] = float(r2_score(target, mean))
    return metrics


def evaluate(model, X_test, y_test=None) -> dict:
    """Held-out metrics of a fitted ReducedModel or UnitGLM: auroc (bernoulli), r2 (gaussian),
    deviance_explained (always), n (samples)."""
    if isinstance(X_test, xr.Dataset):
        target = X_test["target"].values if y_test is None else y_test
    else:
        target = y_test
    target = np.asarray(target, dtype=float).ravel()
    return _metrics(model.family, target, model.decision_function(X_test), model.predict(X_test))


def _is_bernoulli(estimator) -> bool:
    return estimator.family == "bernoulli"


# ----------------------------------------------------------------------------------------------
# The reduced model


class ReducedModel(BaseEstimator):
    """Grouped spatial × temporal filters + history → target, a scikit-learn estimator.

    Parameters
    ----------
    family : ``bernoulli`` (logit link), ``gaussian`` (identity) or ``poisson`` (log).
    structure : ``separable`` (F_g = s_g ⊗ t_g, the seed's model) or ``full`` (free matrix in the bases).
    spatial_basis, temporal_basis : :mod:`reduce.basis` objects evaluated on the distance and lag
        coordinates; ``Identity()`` for one weight per grid point, ``Constant()`` for a flat filter.
    alpha : penalty strength; ``None`` chooses it by block cross-validation.
    l1_ratio : share of the group-lasso part in the penalty (1: pure group lasso, 0: ridge).
    n_alphas, alpha_min_ratio : the cross-validated path, log-spaced from α_max down to α_max × ratio.
    cv : number of block-respecting folds.
    alpha_rule : ``min`` (lowest held-out deviance) or ``1se`` (sparsest within one standard error).
    nonlinearity : ``link`` (the GLM's) or ``empirical`` (monotone, fitted on the training drive).
    tol, max_iter : solver tolerance (gradient mapping relative to the target's spread; for the
        separable fit also the relative objective change that ends the alternation) and the
        iteration cap per solve.
    max_alternations : cap on the separable fit's alternating steps (the two-hop condition's 36
        training prompts, fitted almost exactly, need more than 100).
    random_state : seed of the fold assignment.
    n_jobs : threads for the cross-validation fits (scikit-learn's convention: None is 1, −1 every
        core); the chosen α and the fit do not depend on it.
    warm_start : refit from the previous fit's filters (as scikit-learn's ``warm_start``); the
        bootstrap refits this way, which cuts the separable fit's alternations several-fold.

    Fitted attributes: ``filter_`` (group, distance, lag), ``spatial_filter_`` (group, distance),
    ``temporal_filter_`` (group, lag; unit norm, Σ ≥ 0), ``separability_`` (group: share of the
    filter's energy in its rank-1 part), ``history_filter_`` (history_lag, or None),
    ``intercept_``, ``alpha_``, ``cv_results_`` (dict, or None when α was given),
    ``nonlinearity_`` (knot: empirical rate against drive), ``converged_``, ``n_iter_`` (solver
    iterations of the final fit along its warm-started path).
    """

    def __init__(
        self,
        family: str = "bernoulli",
        structure: str = "separable",
        spatial_basis: Basis = LogRaisedCosine(6),
        temporal_basis: Basis = LogRaisedCosine(10),
        alpha: float | None = None,
        l1_ratio: float = 1.0,
        n_alphas: int = 8,
        alpha_min_ratio: float = 1e-3,
        cv: int = 5,
        alpha_rule: str = "min",
        nonlinearity: str = "link",
        tol: float = 1e-5,
        max_iter: int = 5000,
        max_alternations: int = 500,
        random_state: int = 0,
        n_jobs: int | None = None,
        warm_start: bool = False,
    ):
        self.family = family
        self.structure = structure
        self.spatial_basis = spatial_basis
        self.temporal_basis = temporal_basis
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.cv = cv
        self.alpha_rule = alpha_rule
        self.nonlinearity = nonlinearity
        self.tol = tol
        self.max_iter = max_iter
        self.max_alternations = max_alternations
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.warm_start = warm_start

    def fit(self, X, y=None) -> "ReducedModel":
        """Fit on a dataset (``y`` defaults to ``X.target``) or on a 4-D inputs array and ``y``."""
        family = _family(self.family)
        _check_choice("structure", self.structure, STRUCTURES)
        _check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _check_choice("alpha_rule", self.alpha_rule, ALPHA_RULES)
        dataset = check_dataset(_dataset(X, y), self.family)
        inputs, target = np.asarray(dataset["inputs"].values, dtype=float), np.asarray(dataset["target"].values, dtype=float)
        with _one_blas_thread():  # every product and factorisation of the fit: one core per fit
            spatial = _orthonormal(self.spatial_basis, dataset["distance"].values)
            temporal = _orthonormal(self.temporal_basis, dataset["lag"].values)
            input_mean = inputs.mean(axis=0)
            features = _project(inputs, spatial, temporal)
            features -= features.mean(axis=0)  # = the projection of the centred inputs, without copying them
            history = np.asarray(dataset["history"].values, dtype=float) if "history" in dataset else np.zeros((len(target), 0))
            history_mean = history.mean(axis=0)
            problem = _FilterProblem.from_arrays(
                features, history - history_mean, target, family, self.l1_ratio, temporal, self.structure == "separable",
                tol=self.tol, max_iter=self.max_iter, max_alternations=self.max_alternations,
            )
            state, self.alpha_, self.cv_results_, self.n_iter_ = _fit_with_penalty_path(
                problem, sample_blocks(dataset), alpha=self.alpha, n_alphas=self.n_alphas, alpha_min_ratio=self.alpha_min_ratio, cv=self.cv, alpha_rule=self.alpha_rule, seed=self.random_state, n_jobs=self.n_jobs,
                start=getattr(self, "_state", None) if self.warm_start else None,
            )
        self._state = state
        filters = np.einsum("grs,dr,ls->gdl", state.filters, spatial, temporal)
        intercept = state.intercept - float(np.sum(filters * input_mean)) - float(state.history @ history_mean)
        self._set_filters(dataset, filters, state.history if "history" in dataset else None, intercept)
        self.converged_ = bool(state.converged)
        self.nonlinearity_ = _nonlinearity_array(*_empirical_nonlinearity(problem.drive(state), target))
        _warn_if_not_converged(self, self.converged_)
        return self

    def _set_filters(self, dataset, filters, history_filter, intercept) -> None:
        coords = {dim: dataset[dim].values for dim in INPUT_DIMS[1:]}
        self.filter_ = xr.DataArray(np.ascontiguousarray(filters), dims=INPUT_DIMS[1:], coords=coords, name="filter")
        spatial, temporal, separability = _rank_one(filters, np.eye(filters.shape[2]))
        self.spatial_filter_ = xr.DataArray(spatial, dims=("group", "distance"), coords={k: coords[k] for k in ("group", "distance")}, name="spatial_filter")
        self.temporal_filter_ = xr.DataArray(temporal, dims=("group", "lag"), coords={k: coords[k] for k in ("group", "lag")}, name="temporal_filter")
        self.separability_ = xr.DataArray(separability, dims="group", coords={"group": coords["group"]}, name="separability")
        self.history_filter_ = None
        if history_filter is not None:
            self.history_filter_ = xr.DataArray(history_filter, dims="history_lag", coords={"history_lag": dataset["history_lag"].values}, name="history_filter")
        self.intercept_ = float(intercept)

    def decision_function(self, X) -> np.ndarray:
        """The drive (linear predictor) for each sample of a dataset or 4-D inputs array."""
        check_is_fitted(self, "filter_")
        dataset = check_dataset(_dataset(X), need_target=False)
        drive = self.intercept_ + np.tensordot(_aligned(dataset["inputs"], self.filter_), self.filter_.values, axes=3)
        if self.history_filter_ is not None:
            if "history" not in dataset:
                raise ReduceError("the model was fitted with a history filter; the data has no history", field="history")
            drive = drive + _aligned(dataset["history"], self.history_filter_) @ self.history_filter_.values
        return drive

    def predict(self, X) -> np.ndarray:
        """Expected target: the link's inverse of the drive, or the empirical nonlinearity."""
        drive = self.decision_function(X)
        if self.nonlinearity == "empirical":
            return np.interp(drive, self.nonlinearity_["drive"].values, self.nonlinearity_.values)
        return FAMILIES[self.family].mean(drive)

    @available_if(_is_bernoulli)
    def predict_proba(self, X) -> np.ndarray:
        positive = self.predict(X)
        return np.column_stack([1.0 - positive, positive])

    def score(self, X, y=None) -> float:
        """AUROC (bernoulli), R² (gaussian) or deviance explained (poisson)."""
        dataset = _dataset(X, y)
        return evaluate(self, dataset)[PRIMARY_METRIC[self.family]]

    # -- persistence --------------------------------------------------------------------------

    def to_dataset(self) -> xr.Dataset:
        """Filters as named arrays, cross-validation results, parameters and fit status as attrs."""
        check_is_fitted(self, "filter_")
        variables = [self.filter_, self.spatial_filter_, self.temporal_filter_, self.separability_, self.nonlinearity_]
        if self.history_filter_ is not None:
            variables.append(self.history_filter_)
        dataset = xr.merge([v.to_dataset() for v in variables]).rename({"drive": "nonlinearity_drive"})
        dataset["intercept"] = self.intercept_
        if self.cv_results_ is not None:
            cv = self.cv_results_
            dataset["cv_deviance"] = xr.DataArray(cv["fold_deviance"], dims=("alpha", "fold"), coords={"alpha": cv["alphas"]})
            dataset["cv_converged"] = xr.DataArray(cv["converged"].astype(np.int8), dims=("alpha", "fold"))
        params = {k: (v.to_dict() if isinstance(v, Basis) else v) for k, v in self.get_params().items()}
        dataset.attrs.update(
            params=json.dumps(params), family=self.family, structure=self.structure, alpha=self.alpha_, converged=int(self.converged_), n_iter=int(self.n_iter_)
        )
        return dataset

    def save(self, path) -> Path:
        write_netcdf(self.to_dataset(), path)
        return Path(path)

    @classmethod
    def from_dataset(cls, dataset: xr.Dataset) -> "ReducedModel":
        params = json.loads(dataset.attrs["params"])
        params = {k: (basis_from_dict(v) if k.endswith("_basis") else v) for k, v in params.items()}
        model = cls(**params)
        history = dataset["history_filter"].values if "history_filter" in dataset else None
        model._set_filters(dataset, dataset["filter"].values, history, float(dataset["intercept"]))
        model.alpha_, model.converged_, model.n_iter_ = float(dataset.attrs["alpha"]), bool(dataset.attrs["converged"]), int(dataset.attrs["n_iter"])
        model.nonlinearity_ = _nonlinearity_array(dataset["nonlinearity_drive"].values, dataset["nonlinearity"].values)
        model.cv_results_ = None
        if "cv_deviance" in dataset:
            model.cv_results_ = _cv_results(dataset["alpha"].values, dataset["cv_deviance"].values, dataset["cv_converged"].values.astype(bool))
        return model

    @classmethod
    def load(cls, path) -> "ReducedModel":
        with xr.open_dataset(path, engine="h5netcdf") as dataset:
            return cls.from_dataset(dataset.load())


# ----------------------------------------------------------------------------------------------
# Honest evaluation: bootstrap intervals and the seed's ablated (control) models


def _resample_blocks(blocks, rng) -> np.ndarray:
    """Sample indices of a bootstrap draw: whole blocks drawn with replacement."""
    names, codes = np.unique(blocks, return_inverse=True)
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    drawn = rng.integers(len(names), size=len(names))
    return np.concatenate([members[i] for i in drawn])


def bootstrap(model: ReducedModel, X: xr.Dataset, *, X_test: xr.Dataset | None = None, n: int = 100, seed: int = 0, level: float = 0.95) -> xr.Dataset:
    """Percentile intervals (dim ``bound``: lower, upper) from ``n`` block-bootstrap refits.

    Each draw refits ``model`` at its chosen ``alpha_`` on whole blocks of ``X`` drawn with
    replacement (filters, intercept); with ``X_test``, each refit is also scored on a block
    resample of ``X_test`` (held-out metrics), so metric intervals include both the estimation and
    the test-set uncertainty. ``attrs["n_not_converged"]`` counts refits that did not converge.
    """
    check_is_fitted(model, "filter_")
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {}
    not_converged = 0
    for _ in range(n):
        refit = clone(model).set_params(alpha=model.alpha_, warm_start=True)
        refit._state = model._state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            refit.fit(X.isel(sample=_resample_blocks(sample_blocks(X), rng)))
        not_converged += not refit.converged_
        fitted = {"filter": refit.filter_, "spatial_filter": refit.spatial_filter_, "temporal_filter": refit.temporal_filter_, "intercept": xr.DataArray(refit.intercept_)}
        if refit.history_filter_ is not None:
            fitted["history_filter"] = refit.history_filter_
        if X_test is not None:
            metrics = evaluate(refit, X_test.isel(sample=_resample_blocks(sample_blocks(X_test), rng)))
            fitted.update({name: xr.DataArray(value) for name, value in metrics.items() if name != "n"})
        for name, value in fitted.items():
            draws.setdefault(name, []).append(value)
    tails = [(1 - level) / 2, (1 + level) / 2]
    intervals = {
        name: xr.concat(values, dim="draw").quantile(tails, dim="draw", skipna=True).rename(quantile="bound").assign_coords(bound=["lower", "upper"])
        for name, values in draws.items()
    }
    return xr.Dataset(intervals, attrs={"level": level, "n": n, "seed": seed, "n_not_converged": not_converged})


def _without_history(dataset: xr.Dataset) -> xr.Dataset:
    return dataset.drop_vars(["history", "history_lag"], errors="ignore")


def _groups_merged(dataset: xr.Dataset) -> xr.Dataset:
    merged = dataset["inputs"].sum("group").expand_dims(group=["all"], axis=1)
    return dataset.drop_vars(["inputs", "group"]).assign(inputs=merged)


def _unchanged(dataset: xr.Dataset) -> xr.Dataset:
    return dataset


# name → (parameter overrides, data transform): the seed's reduced models with one part removed.
CONTROLS = {
    "no_history": ({}, _without_history),
    "no_spatial": ({"spatial_basis": Constant()}, _unchanged),
    "no_temporal": ({"temporal_basis": Constant()}, _unchanged),
    "no_sign": ({}, _groups_merged),
}


def fit_controls(model: ReducedModel, X_train: xr.Dataset, X_test: xr.Dataset) -> dict:
    """Held-out metrics of the full model and of each control, and each control's drop.

    Controls: ``no_history`` (history removed; skipped without history), ``no_spatial`` (flat over
    distance), ``no_temporal`` (flat over lag), ``no_sign`` (groups merged into one). Each is a
    clone of ``model`` (same settings, its own cross-validated α) fitted on ``X_train``. ``model``
    is fitted on ``X_train`` first unless it already is. Returns ``{"metric", "full",
    "controls": {name: {metrics..., "drop", "deviance_drop", "converged"}}}``; ``drop`` = full −
    control in the family's primary metric, ``deviance_drop`` the same in deviance explained (an
    AUROC at 1.0 cannot show a loss that the likelihood still sees).
    """
    try:
        check_is_fitted(model, "filter_")
    except NotFittedError:
        model = clone(model).fit(X_train)
    metric = PRIMARY_METRIC[model.family]
    full = evaluate(model, X_test)
    controls = {}
    for name, (params, transform) in CONTROLS.items():
        if name == "no_history" and "history" not in X_train:
            continue
        control = clone(model).set_params(**params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            control.fit(transform(X_train))
        scores = evaluate(control, transform(X_test))
        controls[name] = {**scores, "drop": full[metric] - scores[metric], "deviance_drop": full["deviance_explained"] - scores["deviance_explained"], "converged": control.converged_}
    return {"metric": metric, "full": full, "converged": model.converged_, "controls": controls}


# ----------------------------------------------------------------------------------------------
# The unit-level model


_STATSMODELS_FAMILIES = {"bernoulli": "Binomial", "gaussian": "Gaussian", "poisson": "Poisson"}


class UnitGLM(BaseEstimator):
    """A sparse GLM over individual features (units × lags), with inference on the selected ones.

    ``fit(X, y, blocks=None)``: ``X`` is a 2-D ``xr.DataArray`` (sample, feature) whose feature
    coordinates (e.g. ``unit``, ``lag``) label the columns, or a plain array. The penalty is the
    lasso on standardised columns (``group_by=None``) or the standardised group lasso over the
    features sharing a value of the coordinate ``group_by`` (e.g. ``"unit"``: a unit enters with
    all its lags or not at all), with an elastic-net ridge part for ``l1_ratio < 1``. α is chosen by
    block cross-validation (its fits on ``n_jobs`` threads) (``alpha_rule="1se"`` by default: the sparsest model within one
    standard error of the best). The selected features are refitted without penalty by
    statsmodels for standard errors and p-values (cluster-robust by block when blocks are given).
    Those p-values condition on a selection made on the same data and are optimistic; refit on
    fresh blocks for confirmatory inference.

    Fitted: ``coef_`` (feature, original units), ``intercept_``, ``selected_`` (feature indices),
    ``alpha_``, ``cv_results_``, ``converged_``, ``n_iter_``, ``refit_`` (statsmodels results;
    None when the selected features are collinear on the training samples).
    Prediction uses the penalised coefficients.
    """

    def __init__(
        self,
        family: str = "bernoulli",
        alpha: float | None = None,
        l1_ratio: float = 1.0,
        group_by: str | None = None,
        n_alphas: int = 20,
        alpha_min_ratio: float = 1e-2,
        cv: int = 5,
        alpha_rule: str = "1se",
        tol: float = 1e-5,
        max_iter: int = 5000,
        random_state: int = 0,
        n_jobs: int | None = None,
    ):
        self.family = family
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.group_by = group_by
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.cv = cv
        self.alpha_rule = alpha_rule
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _matrix(self, X) -> np.ndarray:
        if isinstance(X, xr.DataArray):
            if X.ndim != 2 or "sample" not in X.dims:
                raise ReduceError(f"the design must have dims (sample, feature), got {X.dims}", field="features")
            X = X.transpose("sample", ...)
        values = np.asarray(X, dtype=float)
        if values.ndim != 2:
            raise ReduceError(f"the design must be 2-D (sample, feature), got shape {values.shape}", field="features")
        if not np.all(np.isfinite(values)):
            raise ReduceError("the design has NaN or infinite values", field="features")
        return values

    def fit(self, X, y, blocks=None) -> "UnitGLM":
        import statsmodels.api as sm

        family = _family(self.family)
        _check_choice("alpha_rule", self.alpha_rule, ALPHA_RULES)
        design = self._matrix(X)
        target = np.asarray(y, dtype=float).ravel()
        check_target(target, self.family)
        if blocks is None and isinstance(X, xr.DataArray) and "block" in X.coords:
            blocks = X["block"].values
        self.features_ = self._feature_table(X, design.shape[1])
        labels = np.arange(design.shape[1]) if self.group_by is None else pd.factorize(self.features_[self.group_by])[0]
        mean = design.mean(axis=0)
        problem = _LinearProblem.build(design - mean, target, family, labels, np.sqrt(np.bincount(labels)), self.l1_ratio, tol=self.tol, max_iter=self.max_iter)
        fold_blocks = np.arange(len(target)) if blocks is None else np.asarray(blocks)
        with _one_blas_thread():
            solution, self.alpha_, self.cv_results_, self.n_iter_ = _fit_with_penalty_path(
                problem, fold_blocks, alpha=self.alpha, n_alphas=self.n_alphas, alpha_min_ratio=self.alpha_min_ratio, cv=self.cv, alpha_rule=self.alpha_rule, seed=self.random_state, n_jobs=self.n_jobs
            )
        self.coef_ = problem.to_original(solution.coef)
        self.intercept_ = float(solution.intercept - self.coef_ @ mean)
        self.selected_ = np.flatnonzero(self.coef_)
        self.converged_ = bool(solution.converged)
        _warn_if_not_converged(self, self.converged_)

        sm_family = getattr(sm.families, _STATSMODELS_FAMILIES[self.family])()
        exog = sm.add_constant(design[:, self.selected_], has_constant="add")
        covariance = {} if blocks is None else {"cov_type": "cluster", "cov_kwds": {"groups": pd.factorize(np.asarray(blocks))[0]}}
        try:
            self.refit_ = sm.GLM(target, exog, family=sm_family).fit(**covariance)
        except np.linalg.LinAlgError:
            self.refit_ = None  # the selected columns are collinear on these samples: see summary_frame
        return self

    @staticmethod
    def _feature_table(X, n_features) -> pd.DataFrame:
        """One row per feature: its coordinates along the feature dim (or just its index)."""
        if isinstance(X, xr.DataArray):
            feature_dim = next(dim for dim in X.dims if dim != "sample")
            columns = {name: coord.values for name, coord in X.coords.items() if coord.dims == (feature_dim,)}
            if columns:
                return pd.DataFrame(columns)
        return pd.DataFrame({"feature": np.arange(n_features)})

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return self.intercept_ + self._matrix(X) @ self.coef_

    def predict(self, X) -> np.ndarray:
        return FAMILIES[self.family].mean(self.decision_function(X))

    @available_if(_is_bernoulli)
    def predict_proba(self, X) -> np.ndarray:
        positive = self.predict(X)
        return np.column_stack([1.0 - positive, positive])

    def score(self, X, y) -> float:
        return evaluate(self, X, y)[PRIMARY_METRIC[self.family]]

    def summary_frame(self) -> pd.DataFrame:
        """The unpenalised refit of the selected features: one row per term (``intercept`` first)
        with the feature's coordinates, coef, std_err, z, p_value, ci_lower, ci_upper and the
        penalised coefficient."""
        check_is_fitted(self, "refit_")
        if self.refit_ is None:
            raise ReduceError(
                f"the {self.selected_.size} selected features are collinear on the training samples, so the unpenalised refit that gives standard errors does not exist; "
                "choose alpha_rule='1se' or fit on more prompts",
                field="refit",
            )
        interval = np.asarray(self.refit_.conf_int())
        terms = pd.concat([pd.DataFrame({c: [None] for c in self.features_.columns}), self.features_.iloc[self.selected_]], ignore_index=True)
        labels = ["intercept"] + [",".join(f"{k}={v}" for k, v in row.items()) for _, row in self.features_.iloc[self.selected_].iterrows()]
        frame = terms.assign(
            coef=np.asarray(self.refit_.params),
            std_err=np.asarray(self.refit_.bse),
            z=np.asarray(self.refit_.tvalues),
            p_value=np.asarray(self.refit_.pvalues),
            ci_lower=interval[:, 0],
            ci_upper=interval[:, 1],
            penalized_coef=np.concatenate([[self.intercept_], self.coef_[self.selected_]]),
        )
        frame.index = pd.Index(labels, name="term")
        return frame
