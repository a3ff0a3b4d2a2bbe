"""Gradient attribution against exact ablations, finite differences and a linear case; circuit metrics."""

import numpy as np
import pytest
import torch

from reduce.ablate import AblationRunner, Evaluation, PromptBatch, TargetMeasure, single_units, unit_groups
from reduce.attribution import attribute, compare_with_ablation, mean_gradient_by_lag, target_gradients
from reduce.baselines import Baseline, BaselineSource, UnitTable
from reduce.circuits import circuit_curve, faithfulness
from reduce.hooks import Intervention, hooked
from reduce.batching import forward
from reduce.sites import Site, resolve_sites
from reduce.target import Target
from tests.test_baselines import UNIT_SITES, fake_stats, one_thread, padded_batch  # noqa: F401 (autouse fixture)
from tests.tiny import tiny_model

ANSWERS, WRONGS = torch.tensor([40, 41, 42, 43]), torch.tensor([50, 51, 52, 53])
LOGIT_DIFF = Target("logit_diff")


def _exact_effects(model, units, batch, offsets, baseline, rows):
    measure = TargetMeasure(LOGIT_DIFF, ANSWERS, WRONGS)
    runner = AblationRunner(model, units)
    prepared = runner.prepare(batch, measure)
    outcome = runner.run(prepared, single_units(rows, [baseline]), {baseline: offsets}, measure)
    return outcome["target"] - prepared.clean["target"][None]  # (unit, prompt)


def _linear_model():
    """Tiny GPT-2 without its final LayerNorm: the logits are affine in the last layer's MLP neurons."""
    model = tiny_model("gpt2")
    model.module.transformer.ln_f = torch.nn.Identity()
    units = UnitTable.for_sites(model, [Site.parse("blocks.1.mlp.hook_post")])
    return model, units


@pytest.mark.parametrize("baseline", [Baseline.ZERO, Baseline.MEAN, Baseline.RESAMPLE_TOKENS])
def test_attribution_is_exact_where_the_target_is_linear(baseline):
    model, units = _linear_model()
    batch = padded_batch()
    offsets = BaselineSource(model, units, fake_stats(units)).offsets(baseline, batch, range(4))
    exact = _exact_effects(model, units, batch, offsets, baseline, range(len(units)))
    for steps in (None, 3):
        estimate = attribute(model, batch, LOGIT_DIFF, units, offsets, answer_ids=ANSWERS, wrong_ids=WRONGS, steps=steps)
        assert estimate.dims == ("prompt", "unit") and estimate.shape == (4, len(units))
        np.testing.assert_allclose(estimate.values, exact.T, rtol=0, atol=2e-5)


def test_gradients_equal_finite_differences():
    model = tiny_model("gpt2")
    model.module.double()
    batch = padded_batch()
    site = Site.parse("blocks.0.mlp.hook_post")
    target = Target("logit_diff")
    activations, positions, gradients = target_gradients(model, batch, target, [site], answer_ids=ANSWERS, wrong_ids=WRONGS)
    assert len(gradients) == 1 and torch.equal(positions[0], batch.lengths - 1)
    clean = activations[site.name]
    for prompt, pos, unit in [(0, 8, 3), (0, 2, 40), (1, 0, 7), (3, 2, 63)]:
        moved = []
        for step in (1e-5, -1e-5):
            mask = torch.ones_like(clean)
            mask[prompt, pos, unit] = 0
            offset = clean.clone()
            offset[prompt, pos, unit] += step
            with torch.no_grad(), hooked(model, interventions={site: Intervention(mask, offset)}):
                logits = forward(model, batch)
            moved.append(target.values(logits, {}, ANSWERS, WRONGS)[prompt, batch.lengths[prompt] - 1].item())
        numeric = (moved[0] - moved[1]) / 2e-5
        assert gradients[0][site.name][prompt, pos, unit].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert gradients[0][site.name][3, 3:].abs().max() == 0, "padding and later positions get no gradient"


def test_attribution_ranks_exact_single_unit_ablations_on_a_nonlinear_model():
    model = tiny_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    batch = padded_batch()
    for baseline in (Baseline.MEAN, Baseline.RESAMPLE_TOKENS):
        offsets = BaselineSource(model, units, fake_stats(units)).offsets(baseline, batch, range(4))
        exact = _exact_effects(model, units, batch, offsets, baseline, range(len(units))).mean(1)
        plain = attribute(model, batch, LOGIT_DIFF, units, offsets, answer_ids=ANSWERS, wrong_ids=WRONGS).values.mean(0)
        scores = compare_with_ablation(plain, exact, top_k=20)
        assert scores["spearman"] > 0.95 and scores["top_k_overlap"] >= 0.8 and scores["sign_agreement"] > 0.9, scores
        integrated = attribute(model, batch, LOGIT_DIFF, units, offsets, answer_ids=ANSWERS, wrong_ids=WRONGS, steps=8).values.mean(0)
        assert compare_with_ablation(integrated, exact)["spearman"] > 0.95


def test_integrated_gradients_add_up_to_ablating_the_whole_site():
    model = tiny_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    batch = padded_batch()
    offsets = BaselineSource(model, units, fake_stats(units)).offsets(Baseline.PEAK, batch, range(4))
    integrated = attribute(model, batch, LOGIT_DIFF, units, offsets, answer_ids=ANSWERS, wrong_ids=WRONGS, steps=32).values
    groups = {site.name: units.rows(site) for site in units.sites}
    measure = TargetMeasure(LOGIT_DIFF, ANSWERS, WRONGS)
    runner = AblationRunner(model, units)
    prepared = runner.prepare(batch, measure)
    whole = runner.run(prepared, unit_groups(groups, [Baseline.PEAK]), {Baseline.PEAK: offsets}, measure)["target"] - prepared.clean["target"]
    for i, rows in enumerate(groups.values()):
        np.testing.assert_allclose(integrated[:, rows].sum(1), whole[i], rtol=1e-3, atol=1e-4)


def test_frozen_weights_still_give_gradients_and_neuron_targets_work():
    model = tiny_model("bert")
    for parameter in model.module.parameters():
        parameter.requires_grad_(False)
    units = UnitTable.for_sites(model, [Site.parse("blocks.0.mlp.hook_post"), Site.parse("blocks.1.attn.hook_z")])
    target = Target("neuron", site=Site.parse("blocks.1.mlp.hook_post"), unit=3, position=1)
    batch = padded_batch()
    offsets = BaselineSource(model, units).offsets(Baseline.ZERO, batch, range(4))
    estimate = attribute(model, batch, target, units, offsets).values
    measure = TargetMeasure(target)
    runner = AblationRunner(model, units)
    prepared = runner.prepare(batch, measure)
    exact = runner.run(prepared, single_units(range(len(units)), [Baseline.ZERO]), {Baseline.ZERO: offsets}, measure)["target"] - prepared.clean["target"]
    assert np.abs(estimate).max() > 0
    assert compare_with_ablation(estimate.mean(0), exact.mean(1))["spearman"] > 0.9


def test_mean_gradient_by_lag_averages_per_target_position():
    model = tiny_model("gpt2")
    units = UnitTable.for_sites(model, [Site.parse("blocks.0.mlp.hook_post")])
    site = units.sites[0]
    batch = padded_batch()
    target = Target("logit_diff", position="all")
    lags = mean_gradient_by_lag(model, [(batch, ANSWERS, WRONGS)], target, units, max_lag=3)
    assert lags.dims == ("unit", "lag") and list(lags["lag"].values) == [0, 1, 2, 3]
    _, positions, gradients = target_gradients(model, batch, target, [site], answer_ids=ANSWERS, wrong_ids=WRONGS)
    assert len(gradients) == int(batch.lengths.max())
    by_hand = np.zeros((len(units), 4))
    counts = np.zeros(4)
    for at, grads in zip(positions, gradients):
        for prompt in range(4):
            t = int(at[prompt])
            for lag in range(4):
                if t >= 0 and 0 <= t - lag < batch.lengths[prompt]:
                    by_hand[:, lag] += grads[site.name][prompt, t - lag].numpy()
                    counts[lag] += 1
    np.testing.assert_allclose(lags.values, by_hand / counts, rtol=1e-5, atol=1e-8)
    encoder = tiny_model("bert")
    units = UnitTable.for_sites(encoder, [Site.parse("blocks.0.mlp.hook_post")])
    neuron = Target("neuron", site=Site.parse("blocks.1.mlp.hook_post"), unit=0, position=2)
    signed = mean_gradient_by_lag(encoder, [(batch, None, None)], neuron, units, max_lag=2)
    assert list(signed["lag"].values) == [-2, -1, 0, 1, 2] and np.abs(signed.sel(lag=-2).values).max() > 0


def _circuit_evaluation(model, units, baseline=Baseline.MEAN):
    batch = padded_batch()
    source = BaselineSource(model, units, fake_stats(units))
    measure = TargetMeasure(LOGIT_DIFF, ANSWERS, WRONGS)
    return Evaluation(AblationRunner(model, units), [PromptBatch(batch, np.arange(4), measure)], source), source.offsets(baseline, batch, range(4))


def test_circuit_metrics_full_and_empty_circuits():
    model = tiny_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    evaluation, _ = _circuit_evaluation(model, units)
    scores = np.random.default_rng(0).normal(size=len(units))
    curve = circuit_curve(evaluation, scores, [0, 10, len(units)], Baseline.MEAN)
    assert curve["faithfulness"].sel(size=len(units)).item() == pytest.approx(1.0, abs=1e-5)
    assert curve["completeness"].sel(size=len(units)).item() == pytest.approx(0.0, abs=1e-5)
    assert curve["faithfulness"].sel(size=0).item() == pytest.approx(0.0, abs=1e-5)
    assert curve["completeness"].sel(size=0).item() == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(faithfulness(1.0, 2.0, 2.0))


def test_circuit_metrics_in_the_linear_case_add_up_and_follow_attribution():
    model, units = _linear_model()
    evaluation, offsets = _circuit_evaluation(model, units)
    batch = evaluation.prepared[0].batch
    scores = attribute(model, batch, LOGIT_DIFF, units, offsets, answer_ids=ANSWERS, wrong_ids=WRONGS).values.mean(0)
    sizes = [1, 5, 20, 40]
    curve = circuit_curve(evaluation, scores, sizes, Baseline.MEAN)
    # Linear: m(C) − m(∅) = −Σ_{u∈C} effect_u, so faithfulness(C) + completeness(C) = 1.
    np.testing.assert_allclose(curve["faithfulness"] + curve["completeness"], 1.0, atol=1e-4)
    ranked = np.argsort(-np.abs(scores), kind="stable")
    for n in sizes:
        expected = scores[ranked[:n]].sum() / scores.sum()
        assert curve["faithfulness"].sel(size=n).item() == pytest.approx(expected, abs=1e-3)
