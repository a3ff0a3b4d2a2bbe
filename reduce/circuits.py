"""Circuit metrics: how much of the task a set of units carries on its own, and what is left without it.

With ``m`` the mean task metric (the logit difference by default) over the prompts, ``M`` the
whole model, ``∅`` every candidate unit ablated, and ``C`` a circuit (its complement among the
candidates ablated to the chosen baseline):

* faithfulness ``(m(C) − m(∅)) / (m(M) − m(∅))``: 1 when the circuit alone restores the model;
* completeness: the same ratio for the complement ``M∖C`` (``C`` ablated): 0 when nothing
  outside the circuit carries the task.

Circuits are the top-``n`` units by an attribution's magnitude. Each circuit and each complement
is one :class:`~reduce.ablate.Ablation` (plans ``circuit`` / ``circuit_complement``, group
``top{n}``; group ``empty`` ablates every candidate), so they run batched with any other plan and
are scored from stored outcomes as well (:func:`circuit_table`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .ablate import Ablation, Evaluation
from .baselines import Baseline


def faithfulness(m_circuit, m_empty: float, m_full: float):
    """``(m(C) − m(∅)) / (m(M) − m(∅))``; NaN when ablating everything changes nothing."""
    span = m_full - m_empty
    return (np.asarray(m_circuit, dtype=float) - m_empty) / span if span != 0 else np.full(np.shape(m_circuit), np.nan)


def circuit_sizes(n_candidates: int, points: int = 12) -> np.ndarray:
    """Geometrically spaced circuit sizes from 1 to every candidate."""
    return np.unique(np.round(np.geomspace(1, max(n_candidates, 1), points)).astype(int))


def circuit_ablations(scores, sizes, baseline, *, candidates=None) -> list[Ablation]:
    """The ablations that score circuits of the top-``n`` units by ``|scores|`` for each ``n`` in ``sizes``.

    ``scores``: one value per unit of the table (an attribution); ``candidates``: the rows that
    make up the model ``M`` (all units by default).
    """
    baseline = Baseline(baseline)
    scores = np.asarray(scores, dtype=float)
    candidates = np.arange(scores.size) if candidates is None else np.asarray(candidates, dtype=int)
    sizes = np.asarray(sizes, dtype=int)
    if sizes.size and (sizes.min() < 0 or sizes.max() > candidates.size):
        raise ValueError(f"circuit sizes must lie in 0..{candidates.size}")
    ranked = candidates[np.argsort(-np.abs(scores[candidates]), kind="stable")]
    everything = tuple(sorted(candidates.tolist()))
    ablations = [Ablation(everything, baseline, plan="circuit", group="empty")]
    for n in sizes:
        circuit = set(ranked[:n].tolist())
        ablations.append(Ablation(tuple(u for u in everything if u not in circuit), baseline, plan="circuit", group=f"top{n}"))
        ablations.append(Ablation(tuple(sorted(circuit)), baseline, plan="circuit_complement", group=f"top{n}"))
    return ablations


def score_circuits(plans, groups, m, m_full: float) -> xr.Dataset:
    """Faithfulness and completeness over circuit size from circuit ablations' labels and mean metric ``m``."""
    plans, groups, m = np.asarray(plans), np.asarray(groups), np.asarray(m, dtype=float)
    m_empty = float(m[(plans == "circuit") & (groups == "empty")][0])
    circuit = (plans == "circuit") & (groups != "empty")
    complement = plans == "circuit_complement"
    sizes = np.array([int(g[3:]) for g in groups[circuit]])
    by_size = {int(g[3:]): value for g, value in zip(groups[complement], m[complement])}
    m_circuit, m_complement = m[circuit], np.array([by_size[n] for n in sizes])
    return xr.Dataset(
        {
            "faithfulness": ("size", faithfulness(m_circuit, m_empty, m_full)),
            "completeness": ("size", faithfulness(m_complement, m_empty, m_full)),
            "m_circuit": ("size", m_circuit),
            "m_complement": ("size", m_complement),
        },
        coords={"size": sizes},
        attrs={"m_full": m_full, "m_empty": m_empty},
    )


def circuit_curve(evaluation: Evaluation, scores, sizes, baseline, *, candidates=None, metric: str = "logit_diff") -> xr.Dataset:
    """Faithfulness and completeness of attribution-ranked circuits, evaluated in shared batched forwards."""
    plan = circuit_ablations(scores, sizes, baseline, candidates=candidates)
    m = evaluation.run(plan)[metric].mean(1)
    curve = score_circuits([a.plan for a in plan], [a.group for a in plan], m, float(evaluation.clean[metric].mean()))
    return curve.assign_attrs(metric=metric, baseline=Baseline(baseline).value)


def circuit_table(ablations: xr.Dataset, *, metric: str = "logit_diff") -> xr.Dataset:
    """The curves of every baseline's circuits stored in ``ablations.zarr``: (baseline, size)."""
    plans = ablations["plan"].values
    curves = []
    for baseline in dict.fromkeys(ablations["baseline"].values[np.isin(plans, ("circuit", "circuit_complement"))]):
        chosen = ablations.isel(ablation=np.flatnonzero(np.isin(plans, ("circuit", "circuit_complement")) & (ablations["baseline"].values == baseline)))
        m = chosen[metric].mean("prompt").values
        curve = score_circuits(chosen["plan"].values, chosen["group"].values, m, float(ablations[f"clean_{metric}"].mean()))
        curves.append(curve.expand_dims(baseline=[baseline]).drop_attrs())
    return xr.concat(curves, "baseline").assign_attrs(metric=metric)
