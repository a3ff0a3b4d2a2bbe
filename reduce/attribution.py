"""Gradient attribution: every unit's estimated ablation effect from one forward and one backward.

Attribution patching linearises the target around the clean run: ablating unit ``u`` to the
baseline ``b`` moves the target by about ``Σ_pos (b − a) · ∂target/∂a``. Integrated gradients
(``steps=k``) averages the gradient over ``k`` midpoints of the straight path that moves a whole
site from ``a`` to ``b`` (other sites follow the network), so a site's attributions add up to
ablating the whole site: the estimate for group and circuit ablations. For single-unit effects
the gradient at the clean point is the closer estimate (only that unit moves there).

The gradients are taken through the same site hooks as ablation: every unit site gets the
identity intervention ``x · α + b · (1 − α)`` with ``α = 1`` a leaf tensor, so a graph exists
even when the model's weights are frozen, and ``α < 1`` walks the integrated-gradients path.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from scipy.stats import spearmanr

from .ablate import target_per_prompt
from .baselines import UnitTable
from .batching import Batch, forward
from .errors import ReduceError
from .hooks import Intervention, hooked, start_at_layer
from .sites import Site
from .target import Target


def attribute(model, batch: Batch, target: Target, units: UnitTable, offsets: dict[str, torch.Tensor], *, answer_ids=None, wrong_ids=None, steps: int | None = None) -> xr.DataArray:
    """Estimated change of each prompt's target when each unit is ablated to the baseline: (prompt, unit).

    ``offsets``: ``{site name: (units,) or (batch, pos, units)}`` for this batch
    (:meth:`reduce.baselines.BaselineSource.offsets`). ``steps``: integrated gradients with that
    many midpoint steps per site instead of one gradient at the clean point.
    """
    batch = batch.to(model.device)
    estimate = torch.zeros(len(batch), len(units), dtype=torch.float64)
    if steps is None:
        graph = _graph(model, batch, target, units.sites, offsets, answer_ids, wrong_ids)
        gradients = torch.autograd.grad(graph.objective, [graph.recorded[s.name] for s in units.sites], allow_unused=True, materialize_grads=True)
        for site, gradient in zip(units.sites, gradients):
            estimate[:, units.rows(site)] = _effect(units, site, graph.recorded[site.name].detach(), offsets[site.name], gradient, batch)
    else:
        estimate = _integrated(model, batch, target, units, offsets, answer_ids, wrong_ids, steps, estimate)
    return xr.DataArray(estimate.numpy(), dims=("prompt", "unit"), coords=units.coords(), name="attribution")


def target_gradients(model, batch: Batch, target: Target, sites, *, answer_ids=None, wrong_ids=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Per-(prompt, pos, unit) gradients of the target at each target position.

    Returns ``(activations, positions, gradients)``: ``activations[site]`` is ``(batch, pos, units)``;
    for the ``k``-th target position of every prompt, ``positions[k]`` is ``(batch,)`` (−1 where
    a prompt has fewer) and ``gradients[k][site]`` the gradient of the target there. A target
    at one position per prompt ("last" or an index) takes one backward pass; ``"all"`` one per position.
    """
    batch = batch.to(model.device)
    sites = list(sites)
    graph = _graph(model, batch, target, sites, {}, answer_ids, wrong_ids)
    where = target.position_mask(batch.lengths, batch.width)
    rank = torch.cumsum(where.long(), 1) * where  # k-th target position of a prompt has rank k + 1
    activations = {s.name: graph.recorded[s.name].detach() for s in sites}
    positions, gradients = [], []
    for k in range(int(rank.max())):
        at = rank == k + 1
        objective = (graph.values * at).sum()
        grads = torch.autograd.grad(objective, [graph.recorded[s.name] for s in sites], retain_graph=True, allow_unused=True, materialize_grads=True)
        positions.append(torch.where(at.any(1), at.float().argmax(1), -1))
        gradients.append({s.name: g.detach() for s, g in zip(sites, grads)})
    return activations, positions, gradients


def mean_gradient_by_lag(model, batches, target: Target, units: UnitTable, *, max_lag: int) -> xr.DataArray:
    """(unit, lag) mean gradient of the target at ``t`` with respect to each unit at ``t − lag``.

    ``batches``: iterable of ``(batch, answer_ids, wrong_ids)``. Lags run ``0..max_lag`` in causal
    models and ``−max_lag..max_lag`` in encoders; a (lag, target position) pair counts where
    ``t − lag`` is a real token. The sign of this mean is the excitatory / inhibitory grouping.
    """
    lags = np.arange(0 if model.causal else -max_lag, max_lag + 1)
    total = torch.zeros(len(units), lags.size, dtype=torch.float64)
    count = torch.zeros(lags.size, dtype=torch.float64)
    for batch, answer_ids, wrong_ids in batches:
        batch = batch.to(model.device)
        _, positions, gradients = target_gradients(model, batch, target, units.sites, answer_ids=answer_ids, wrong_ids=wrong_ids)
        for at, by_site in zip(positions, gradients):
            source = at[:, None] - torch.as_tensor(lags, device=at.device)[None]  # (prompt, lag)
            valid = (at[:, None] >= 0) & (source >= 0) & (source < batch.lengths[:, None])
            count += valid.sum(0).double().cpu()
            index = source.clamp(0, batch.width - 1)[..., None]
            for site in units.sites:
                gradient = by_site[site.name]
                picked = gradient.gather(1, index.expand(-1, -1, gradient.shape[-1])) * valid[..., None]
                total[units.rows(site)] += units.gather(picked.sum(0), site).T.double().cpu()
    mean = total / count.clamp(min=1)
    return xr.DataArray(mean.numpy(), dims=("unit", "lag"), coords={**units.coords(), "lag": lags}, name="mean_gradient")


def compare_with_ablation(estimated, exact, *, top_k: int = 20) -> dict:
    """How well estimated per-unit effects rank the exact single-unit ablation effects.

    ``spearman`` over units; ``top_k_overlap``: the share of the ``top_k`` units by |exact effect|
    that are also among the ``top_k`` by |estimate|; ``sign_agreement`` over units whose exact
    effect is not zero.
    """
    estimated, exact = np.asarray(estimated, dtype=float).ravel(), np.asarray(exact, dtype=float).ravel()
    if estimated.shape != exact.shape:
        raise ValueError(f"{estimated.size} estimates for {exact.size} exact effects")
    top_k = min(top_k, exact.size)
    top_estimated = set(np.argsort(-np.abs(estimated))[:top_k].tolist())
    top_exact = set(np.argsort(-np.abs(exact))[:top_k].tolist())
    moved = exact != 0
    return {
        "spearman": float(spearmanr(estimated, exact).statistic),
        "top_k": top_k,
        "top_k_overlap": len(top_estimated & top_exact) / top_k,
        "sign_agreement": float(np.mean(np.sign(estimated[moved]) == np.sign(exact[moved]))) if moved.any() else float("nan"),
        "n_units": int(exact.size),
    }


@dataclass
class _Graph:
    recorded: dict[str, torch.Tensor]
    values: torch.Tensor  # (batch, pos)
    objective: torch.Tensor  # Σ over prompts of the target per prompt


def _graph(model, batch, target, sites, offsets, answer_ids, wrong_ids, *, alpha=None, start: int = 0, resid_pre=None) -> _Graph:
    """A forward with a graph through every site (identity interventions at ``α``; 1 by default)."""
    alpha = torch.ones((), device=batch.input_ids.device, requires_grad=True) if alpha is None else alpha
    interventions = {site: Intervention(alpha, offsets.get(site.name, torch.zeros((), device=alpha.device))) for site in sites}
    with torch.enable_grad(), ExitStack() as stack:
        if start > 0:
            stack.enter_context(start_at_layer(model, start, resid_pre))
        recorded = stack.enter_context(hooked(model, record=[*sites, *target.sites], interventions=interventions, retain_grad=True))
        output = forward(model, batch)
        answer = None if answer_ids is None else torch.as_tensor(answer_ids, device=batch.input_ids.device).repeat(len(batch) // len(answer_ids))
        wrong = None if wrong_ids is None else torch.as_tensor(wrong_ids, device=batch.input_ids.device).repeat(len(batch) // len(wrong_ids))
        values = target.values(output, recorded, answer, wrong)
        objective = target_per_prompt(values, target.position_mask(batch.lengths, batch.width)).sum()
    return _Graph(dict(recorded), values, objective)


def _effect(units: UnitTable, site: Site, activation, offset, gradient, batch: Batch) -> torch.Tensor:
    """Σ over real positions of (b − a) · gradient, per (prompt, unit of the table)."""
    real = batch.attention_mask[..., None].to(gradient.dtype)
    change = (offset.to(activation.device, activation.dtype) - activation) * gradient * real
    return units.gather(change.sum(1), site).double().cpu()


@torch.no_grad()
def _clean_run(model, batch, sites):
    resid_sites = [Site.parse(f"blocks.{l}.hook_resid_pre") for l in range(model.n_layers)]
    with hooked(model, record=[*sites, *resid_sites], stop_after_record=True) as recorded:
        forward(model, batch)
    return dict(recorded)


def _integrated(model, batch, target, units, offsets, answer_ids, wrong_ids, steps, estimate):
    if steps < 1:
        raise ReduceError(f"integrated gradients needs at least one step, not {steps}", field="attribution.steps")
    clean = _clean_run(model, batch, units.sites)
    rows = batch.repeat(steps)
    # Midpoints of the path from the activation (α = 1) to the baseline (α = 0), one block of rows per step.
    alpha = (1 - (torch.arange(steps, dtype=torch.float32) + 0.5) / steps).repeat_interleave(len(batch))[:, None, None].to(batch.input_ids.device).requires_grad_()
    target_layer = min((s.layer for s in target.sites), default=model.n_layers)
    for site in units.sites:
        offset = offsets[site.name]
        start = min(site.layer, target_layer)
        graph = _graph(
            model, rows, target, [site], {site.name: offset.repeat(steps, 1, 1) if offset.dim() == 3 else offset}, answer_ids, wrong_ids,
            alpha=alpha, start=start, resid_pre=clean[f"blocks.{start}.hook_resid_pre"].repeat(steps, 1, 1),
        )  # fmt: skip
        (gradient,) = torch.autograd.grad(graph.objective, [graph.recorded[site.name]], allow_unused=True, materialize_grads=True)
        mean_gradient = gradient.reshape(steps, len(batch), *gradient.shape[1:]).mean(0)
        estimate[:, units.rows(site)] = _effect(units, site, clean[site.name], offset, mean_gradient, batch)
    return estimate
