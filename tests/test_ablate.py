"""The runner's speed-ups are exact, plans have the advertised shape, outcomes tables read right."""

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from reduce.ablate import (
    Ablation,
    AblationRunner,
    EmbeddingMeasure,
    Evaluation,
    Measures,
    NextTokenMeasure,
    PromptBatch,
    SitesMeasure,
    TargetMeasure,
    degradation_markdown,
    degradation_table,
    groups_by,
    held_out_outcomes,
    plot_degradation,
    random_pruning,
    single_units,
    unit_groups,
)
from reduce.baselines import Baseline, BaselineSource, UnitTable
from reduce.batching import Batch
from reduce.sites import Site, resolve_sites
from reduce.target import Target
from tests.test_baselines import UNIT_SITES, fake_stats, one_thread, padded_batch  # noqa: F401 (autouse fixture)
from tests.tiny import tiny_model

ANSWERS, WRONGS = torch.tensor([40, 41, 42, 43]), torch.tensor([50, 51, 52, 53])


def _mixed_plan(units: UnitTable, baselines) -> list[Ablation]:
    """Single units in every site, whole layers, nested random subsets, and position-specific ablations."""
    rng = np.random.default_rng(0)
    singles = [int(rows[i]) for site in units.sites for rows in [units.rows(site)] for i in rng.choice(rows.size, 3, replace=False)]
    plan = single_units(singles, baselines)
    plan += unit_groups(groups_by(units, "layer"), baselines)
    plan += random_pruning(np.arange(len(units)), baselines, fractions=(0.0, 0.3, 1.0), seeds=(0, 1))
    plan += single_units(singles[:4], baselines, position="last") + single_units(singles[4:8], baselines, position=1)
    return plan


def _setup(family, target):
    model = tiny_model(family)
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    source = BaselineSource(model, units, fake_stats(units))
    measure = TargetMeasure(target, ANSWERS, WRONGS) if target.kind != "neuron" else TargetMeasure(target)
    return model, units, source, measure


CASES = {
    "gpt2": Target("logit_diff"),
    "gpt_neox": Target("logit", position=-2),
    "llama": Target("logit_diff", position="all"),
    "bert": Target("neuron", site=Site.parse("blocks.1.mlp.hook_post"), unit=5, position=2),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_stacked_and_layer_reusing_runs_equal_one_forward_per_ablation(family):
    model, units, source, measure = _setup(family, CASES[family])
    batch = padded_batch()
    baselines = [Baseline.MEAN, Baseline.RESAMPLE_TOKENS]
    plan = _mixed_plan(units, baselines)
    offsets = {b: source.offsets(b, batch, range(len(batch))) for b in baselines}
    naive = AblationRunner(model, units, stack_settings=False, reuse_layers=False)
    expected = naive.run(naive.prepare(batch, measure), plan, offsets, measure)
    for options in ({"reuse_layers": False}, {"stack_settings": False}, {"max_rows": 12}, {}):
        fast = AblationRunner(model, units, **options)
        got = fast.run(fast.prepare(batch, measure), plan, offsets, measure)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=f"{family} {options} {name}")
    assert np.isnan(expected["target_by_pos"][:, 3, 3:]).all(), "padding reads NaN"
    clean = naive.prepare(batch, measure).clean["target"]
    moved = np.abs(expected["target"] - clean).max(1) > 1e-6
    assert moved.mean() > 0.5, "most ablations must change the target"


@pytest.mark.parametrize("family, mlp, attn", [("gpt2", True, False), ("gpt_neox", True, True), ("llama", True, False), ("bert", False, False)])
def test_layers_are_skipped_only_where_units_reach_the_residual_stream_linearly(family, mlp, attn):
    model, units, source, measure = _setup(family, CASES.get(family, Target("logit_diff")))
    runner = AblationRunner(model, units)
    prepared = runner.prepare(padded_batch(), measure)
    layer0 = {kind: int(np.flatnonzero((units.layer == 0) & (units.kind == kind))[0]) for kind in ("mlp", "attn")}
    assert runner.entry(Ablation((layer0["mlp"],), Baseline.ZERO), prepared) == ((1, True) if mlp else (0, False))
    assert runner.entry(Ablation((layer0["attn"],), Baseline.ZERO), prepared) == ((1, True) if attn else (0, False))
    last = {kind: int(np.flatnonzero((units.layer == model.n_layers - 1) & (units.kind == kind))[0]) for kind in ("mlp", "attn")}
    assert runner.entry(Ablation((last["mlp"],), Baseline.ZERO), prepared) == ((model.n_layers, True) if mlp else (model.n_layers - 1, False))
    assert runner.entry(Ablation((last["attn"],), Baseline.ZERO), prepared) == ((model.n_layers, True) if attn else (model.n_layers - 1, False))
    assert runner.entry(Ablation((), Baseline.ZERO), prepared) == (model.n_layers, False)


def test_padded_batch_equals_one_prompt_runs():
    model, units, source, measure = _setup("gpt2", CASES["gpt2"])
    batch = padded_batch()
    plan = _mixed_plan(units, [Baseline.PEAK])
    runner = AblationRunner(model, units)
    offsets = {Baseline.PEAK: source.offsets(Baseline.PEAK, batch, range(4))}
    together = runner.run(runner.prepare(batch, measure), plan, offsets, measure)
    for i in range(len(batch)):
        n = int(batch.lengths[i])
        alone = Batch(batch.input_ids[i : i + 1, :n], batch.attention_mask[i : i + 1, :n], batch.lengths[i : i + 1])
        single = TargetMeasure(measure.target, ANSWERS[i : i + 1], WRONGS[i : i + 1])
        got = runner.run(runner.prepare(alone, single), plan, offsets, single)
        np.testing.assert_allclose(together["logit_diff"][:, i], got["logit_diff"][:, 0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(together["target_by_pos"][:, i, :n], got["target_by_pos"][:, 0], rtol=0, atol=1e-5)


def test_evaluation_over_batches_equals_one_batch_and_keeps_prompt_order():
    model, units, source, measure = _setup("gpt2", CASES["gpt2"])
    batch = padded_batch()
    runner = AblationRunner(model, units)
    plan = single_units([0, 70, 200], [Baseline.RESAMPLE_TOKENS, Baseline.ZERO])
    whole = Evaluation(runner, [PromptBatch(batch, np.arange(4), measure)], source)
    # Batches out of order, each padded only to its own longest prompt.
    parts = []
    for rows in ([3, 1], [2, 0]):
        width = int(batch.lengths[rows].max())
        part = Batch(batch.input_ids[rows, :width], batch.attention_mask[rows, :width], batch.lengths[rows])
        parts.append(PromptBatch(part, np.array(rows), TargetMeasure(measure.target, ANSWERS[rows], WRONGS[rows])))
    split = Evaluation(runner, parts, source)
    expected, got = whole.run(plan), split.run(plan)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(split.clean["logit_diff"], whole.clean["logit_diff"], rtol=0, atol=1e-5)


def test_recording_sites_under_ablation_shows_the_ablated_values():
    model, units, source, measure = _setup("gpt2", CASES["gpt2"])
    batch = padded_batch()
    site = Site.parse("blocks.1.mlp.hook_post")
    rows = units.rows(site)[[2, 7]]
    runner = AblationRunner(model, units)
    both = Measures((measure, SitesMeasure((site, Site.parse("blocks.1.hook_resid_pre")))))
    offsets = {Baseline.PEAK: source.offsets(Baseline.PEAK, batch, range(4))}
    got = runner.run(runner.prepare(batch, both), unit_groups({"two": rows}, [Baseline.PEAK], position="last"), offsets, both)
    recorded = got[site.name][0]
    last = (batch.lengths - 1).numpy()
    peaks = source.stats["peak"].values[rows]
    np.testing.assert_allclose(recorded[np.arange(4), last][:, [2, 7]], np.broadcast_to(peaks, (4, 2)), atol=1e-6)
    assert not np.allclose(recorded[0, 0, [2, 7]], peaks), "other positions keep their activation"
    assert got["blocks.1.hook_resid_pre"].shape == (1, 4, batch.width, model.d_model)


def test_random_pruning_nests_and_matches_across_baselines():
    plan = random_pruning(np.arange(50, 150), ["zero", "peak"], seeds=(0, 1, 2))
    assert len(plan) == 2 * 3 * 11
    by_key = {(a.baseline, a.seed, a.fraction): set(a.units) for a in plan}
    for seed in (0, 1, 2):
        sizes = [len(by_key[Baseline.ZERO, seed, f]) for f in np.round(np.arange(11) / 10, 1)]
        assert sizes == list(range(0, 101, 10))
        assert by_key[Baseline.ZERO, seed, 0.5] < by_key[Baseline.ZERO, seed, 0.9] <= set(range(50, 150))
        assert by_key[Baseline.ZERO, seed, 0.5] == by_key[Baseline.PEAK, seed, 0.5]
    assert by_key[Baseline.ZERO, 0, 0.5] != by_key[Baseline.ZERO, 1, 0.5]


def test_groups_by_covers_the_table_once():
    model = tiny_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    groups = groups_by(units, "layer", "kind")
    assert sorted(groups) == ["layer=0/kind=attn", "layer=0/kind=mlp", "layer=1/kind=attn", "layer=1/kind=mlp"]
    assert np.array_equal(np.sort(np.concatenate(list(groups.values()))), np.arange(len(units)))


def test_next_token_measure_is_cross_entropy_and_top1_over_real_tokens():
    model = tiny_model("gpt2")
    batch = padded_batch()
    with torch.no_grad():
        logits = model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    got = NextTokenMeasure()(logits, {}, batch, torch.arange(4))
    for i, n in enumerate(batch.lengths.tolist()):
        ce = torch.nn.functional.cross_entropy(logits[i, : n - 1], batch.input_ids[i, 1:n], reduction="sum")
        hits = (logits[i, : n - 1].argmax(-1) == batch.input_ids[i, 1:n]).sum()
        assert got["ce_sum"][i].item() == pytest.approx(ce.item(), rel=1e-5)
        assert got["correct"][i].item() == hits.item() and got["tokens"][i].item() == n - 1


def _pruning_outcomes(family: str) -> xr.Dataset:
    """Random pruning of a tiny model's attention units scored on held-out random text."""
    model = tiny_model(family)
    units = UnitTable.for_sites(model, resolve_sites(["blocks.*.attn.hook_z"], model.n_layers))
    source = BaselineSource(model, units, fake_stats(units))
    measure = NextTokenMeasure() if model.causal else EmbeddingMeasure.for_model(model)
    plan = random_pruning(np.arange(len(units)), [Baseline.ZERO, Baseline.PEAK_NAIVE, Baseline.RESAMPLE_TOKENS], fractions=(0.0, 0.5, 0.9))
    evaluation = Evaluation(AblationRunner(model, units), [PromptBatch(padded_batch(seed=5), np.arange(4), measure)], source, stream="text")
    return held_out_outcomes(evaluation, plan).assign_attrs(model=f"tiny-{family}")


def test_degradation_table_and_figure_follow_seed_004_layout(tmp_path):
    causal, encoder = _pruning_outcomes("gpt2"), _pruning_outcomes("bert")
    table = degradation_table({"tiny-gpt2": causal, "tiny-bert": encoder})
    assert isinstance(table, pd.DataFrame)
    top1 = table[(table["model"] == "tiny-gpt2") & (table["metric"] == "Top1 Accuracy")]
    assert list(top1["pruning"]) == ["Baseline"] + ["50% Pruning"] * 3 + ["90% Pruning"] * 3
    assert list(top1["baseline"])[1:4] == ["Zero", "Peak", "RS2"]
    at_half = causal.isel(ablation=np.flatnonzero((causal["fraction"].values == 0.5) & (causal["baseline"].values == "peak_naive")))
    row = top1[(top1["pruning"] == "50% Pruning") & (top1["baseline"] == "Peak")].iloc[0]
    assert row["mean"] == pytest.approx(100 * at_half["top1"].values.mean())
    assert row["sd"] == pytest.approx(100 * at_half["top1"].values.std(ddof=1))
    cosine = table[table["metric"] == "Cosine Similarity"]
    assert cosine.iloc[0]["mean"] == pytest.approx(1.0, abs=1e-6) and (cosine["mean"].iloc[1:] < 1).all()
    markdown = degradation_markdown(table)
    assert "| Top1 Accuracy | | tiny-gpt2 | tiny-bert |" in markdown and "**" in markdown
    figure = tmp_path / "degradation.png"
    plot_degradation({"tiny-gpt2": causal, "tiny-bert": encoder}, figure)
    assert figure.stat().st_size > 10_000


CONDITION = """
name = "tiny"
seed = 0
[model]
name = "{model}"
[prompts]
template = "the {{noun}} {{verb}}"
answer = "{{noun.answer}}"
wrong = "{{noun.wrong}}"
counterfactual = "the {{noun.flip}} {{verb}}"
[prompts.slots]
noun = [{{text="cat", flip="dog", answer="a", wrong="b"}}, {{text="dog", flip="cat", answer="b", wrong="a"}}, {{text="bird", flip="fish", answer="c", wrong="d"}}]
verb = ["sat", "ran"]
[target]
kind = "logit_diff"
[record]
sites = ["blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"]
batch_size = 4
[ablation]
baselines = ["zero", "peak", "resample_counterfactual"]
plans = ["random", "groups", "circuit"]
fractions = [0.0, 0.5, 0.9]
seeds = [0, 1]
eval_text = "{text}"
max_eval_sequences = 3
"""


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A tiny GPT-2 saved as a local model folder, its condition, and a recorded run directory."""
    from reduce.record import record
    from tests.test_baselines import text_model

    folder = tmp_path_factory.mktemp("ablate_stage")
    model = text_model("gpt2")
    model.module.save_pretrained(folder / "model")
    model.tokenizer.save_pretrained(folder / "model")
    (folder / "eval.txt").write_text("the cat sat on the mat.\nbirds fly south in winter!\nok then\n")
    condition = folder / "condition.toml"
    condition.write_text(CONDITION.format(model=folder / "model", text=folder / "eval.txt"))
    record(condition, folder / "recorded", progress=False)
    return folder, condition


def _copy_run(folder, name):
    import shutil

    shutil.copytree(folder / "recorded", folder / name)
    return folder / name


def test_ablate_stage_resumes_after_a_kill_and_matches_an_uninterrupted_run(recorded_run, monkeypatch):
    from reduce import ablate as stage
    from reduce.circuits import circuit_table

    folder, condition = recorded_run
    interrupted, fresh = _copy_run(folder, "interrupted"), _copy_run(folder, "fresh")
    written = []
    original = stage._AblationStore.write_block

    def killed_after_two(self, block, rows, values):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(block)
        original(self, block, rows, values)

    monkeypatch.setattr(stage._AblationStore, "write_block", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        stage.ablate(condition, interrupted, progress=False, record_sites_for=("groups",))
    assert not (interrupted / stage.ABLATIONS).exists(), "nothing is published before the end"
    monkeypatch.setattr(stage._AblationStore, "write_block", lambda self, block, rows, values: (written.append(block), original(self, block, rows, values)))
    resumed = stage.ablate(condition, interrupted, progress=False, record_sites_for=("groups",)).load()
    n_blocks = -(-resumed.sizes["ablation"] // stage.BLOCK)
    assert sorted(written) == list(range(n_blocks)) and len(written) == n_blocks, "finished blocks are not redone"
    reference = stage.ablate(condition, fresh, progress=False, record_sites_for=("groups",)).load()
    xr.testing.assert_allclose(resumed, reference)
    written.clear()
    stage.ablate(condition, interrupted, progress=False, record_sites_for=("groups",))
    assert written == [], "a finished stage is not rerun"

    # What the store holds reads as documented.
    assert set(resumed["plan"].values) == {"random", "groups", "circuit", "circuit_complement"}
    assert resumed["ablated"].dtype == bool and resumed.sizes["unit"] == 128 + 32
    random = resumed.isel(ablation=np.flatnonzero(resumed["plan"].values == "random"))
    np.testing.assert_array_equal(random["ablated"].sum("unit").values, np.round(random["fraction"].values * 160))
    untouched = random.isel(ablation=np.flatnonzero(random["fraction"].values == 0))
    np.testing.assert_allclose(untouched["logit_diff"].values, np.broadcast_to(resumed["clean_logit_diff"].values, untouched["logit_diff"].shape), atol=1e-5)
    with_text = untouched["baseline"].values != "resample_counterfactual"
    np.testing.assert_allclose(untouched["cross_entropy"].values[with_text], resumed["clean_cross_entropy"].item(), atol=1e-6)
    counterfactual = resumed["baseline"].values == "resample_counterfactual"
    assert np.isnan(resumed["top1"].values[counterfactual]).all() and np.isfinite(resumed["logit_diff"].values[counterfactual]).all()
    layer1 = np.flatnonzero((resumed["group"].values == "layer=1") & (resumed["baseline"].values == "zero"))[0]
    neurons = resumed["blocks.1.mlp.hook_post"].isel(ablation=layer1).values
    real = np.arange(resumed.sizes["pos"])[None] < resumed["length"].values[:, None]
    assert np.all(neurons[real] == 0) and np.isnan(resumed["blocks.1.mlp.hook_post"].isel(ablation=0).values).all()
    assert {"attribution", "mean_gradient"} <= set(xr.open_dataset(interrupted / stage.ATTRIBUTION, engine="h5netcdf").data_vars)
    circuits = circuit_table(resumed)
    assert circuits.sizes["baseline"] == 3 and np.allclose(circuits["faithfulness"].isel(size=-1), 1.0)
    table = degradation_table(resumed)
    assert "RS counterfactual" not in set(table["baseline"]), "no held-out text partner, so no row"


def test_ablate_stage_needs_statistics_for_mean_and_peak(recorded_run, tmp_path):
    from reduce.ablate import ablate
    from reduce.errors import ReduceError

    folder, condition = recorded_run
    with pytest.raises(ReduceError, match="stats.nc"):
        ablate(condition, tmp_path / "empty", progress=False)
