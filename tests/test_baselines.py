"""Every baseline, applied by the runner, equals a hand-written hook that overwrites the units."""

import string

import numpy as np
import pytest
import torch
import xarray as xr

from reduce.ablate import AblationRunner, TargetMeasure, unit_groups
from reduce.baselines import Baseline, BaselineSource, UnitTable
from reduce.batching import Batch, encode
from reduce.errors import ReduceError
from reduce.sites import Site, resolve_sites
from reduce.target import Target
from tests.tiny import tiny_model

UNIT_SITES = ["blocks.*.mlp.hook_post", "blocks.*.attn.hook_z"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine OpenMP's second thread
    spin-waits and makes every small op about ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def char_tokenizer():
    """A character-level tokenizer that fits the tiny models' 100-token vocabulary (BOS prepended)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(string.printable[:95])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<s>", pad_token="<pad>")


def text_model(family="gpt2", seed=0):
    model = tiny_model(family, seed)
    model.tokenizer = char_tokenizer()
    return model


def padded_batch(lengths=(9, 5, 7, 3), seed=0, low=2) -> Batch:
    """Random ids, right-padded to the longest of ``lengths`` (pad id 1)."""
    lengths = torch.tensor(lengths)
    width = int(lengths.max())
    ids = torch.randint(low, 97, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return Batch(torch.where(mask.bool(), ids, 1), mask, lengths)


def fake_stats(units: UnitTable, seed=0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    data = {name: ("unit", rng.normal(size=len(units)).astype(np.float32)) for name in ("mean", "peak_naive", "peak", "var")}
    return xr.Dataset(data, coords=units.coords())


def overwrite_by_hand(model, batch, replacements, target_measure):
    """Forward with plain torch pre-hooks writing ``values`` into ``units`` of each out-projection."""
    handles = []
    for site, (units, values) in replacements.items():
        layer = model.layer(site.layer)
        module = layer.get_submodule(model.arch.mlp_out if site.kind == "mlp" else model.arch.attn_out)

        def hook(module, args, units=units, values=values):
            x = args[0].clone()
            x[..., units] = values[..., units] if values.dim() == 3 else values[units]
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            return target_measure(logits, {}, batch, torch.arange(len(batch)))
    finally:
        for handle in handles:
            handle.remove()


def source_activations(model, batch, site):
    captured = {}
    layer = model.layer(site.layer)
    module = layer.get_submodule(model.arch.mlp_out if site.kind == "mlp" else model.arch.attn_out)
    handle = module.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    handle.remove()
    return captured["x"]


@pytest.fixture(scope="module")
def setup():
    model = text_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    batch = encode(model, ["the cat sat.", "a dog!", "birds fly south", "ok"])
    measure = TargetMeasure(Target("logit_diff"), torch.tensor([40, 41, 42, 43]), torch.tensor([50, 51, 52, 53]))
    counterfactuals = ["the rat sat.", "a cow!", "birds run south", "no"]
    source = BaselineSource(model, units, fake_stats(units), seed=3, counterfactual_texts=counterfactuals)
    return model, units, batch, measure, source


def _chosen(units, model):
    """Units in two sites of different layers and kinds: (site, within-site index, table rows)."""
    picks = {Site.parse("blocks.0.mlp.hook_post"): np.array([1, 5, 9, 60]), Site.parse("blocks.1.attn.hook_z"): np.array([0, 3, 17, 31])}
    rows = np.concatenate([units.rows(site)[index] for site, index in picks.items()])
    return picks, rows


@pytest.mark.parametrize("baseline", list(Baseline))
def test_baseline_equals_hand_written_hook(setup, baseline):
    model, units, batch, measure, source = setup
    picks, rows = _chosen(units, model)
    runner = AblationRunner(model, units)
    prepared = runner.prepare(batch, measure)
    offsets = source.offsets(baseline, batch, range(len(batch)))
    result = runner.run(prepared, unit_groups({"picked": rows}, [baseline]), {baseline: offsets}, measure)
    if baseline.is_resample:
        source_batch = source.source_batch(baseline, batch, range(len(batch)))
        values = {site: source_activations(model, source_batch, site) for site in picks}
    elif baseline is Baseline.ZERO:
        values = {site: torch.zeros(model.n_units(site)) for site in picks}
    else:
        table = source.stats[baseline.value].values
        values = {site: torch.from_numpy(units.scatter(table, site, model.n_units(site))) for site in picks}
    by_hand = overwrite_by_hand(model, batch, {site: (torch.from_numpy(index), values[site]) for site, index in picks.items()}, measure)
    clean = prepared.clean["logit_diff"]
    assert not np.allclose(result["logit_diff"][0], clean), "the ablation must change the output"
    np.testing.assert_allclose(result["logit_diff"][0], by_hand["logit_diff"].numpy(), rtol=0, atol=1e-5)
    real = batch.attention_mask.bool().numpy()
    np.testing.assert_allclose(result["target_by_pos"][0][real], by_hand["target_by_pos"].numpy()[real], rtol=0, atol=1e-5)


def test_resample_sources_are_position_aligned_and_cover_every_prompt(setup):
    model, units, batch, measure, source = setup
    for baseline in (b for b in Baseline if b.is_resample):
        resampled = source.source_batch(baseline, batch, range(len(batch)))
        assert resampled.width == batch.width
        assert bool((resampled.lengths >= batch.lengths).all()), baseline
        assert not torch.equal(resampled.input_ids, batch.input_ids), baseline
    counterfactual = source.source_batch(Baseline.RESAMPLE_COUNTERFACTUAL, batch, range(len(batch)))
    assert torch.equal(counterfactual.lengths, batch.lengths)
    tokens = source.source_batch(Baseline.RESAMPLE_TOKENS, batch, range(len(batch)))
    assert torch.equal(tokens.input_ids[:, 0], batch.input_ids[:, 0]), "BOS stays in place"


def test_random_sources_do_not_depend_on_the_batch_a_prompt_sits_in(setup):
    model, units, batch, measure, source = setup
    for baseline in (Baseline.RESAMPLE_TOKENS, Baseline.RESAMPLE_CHARACTERS, Baseline.RESAMPLE_GENERATED):
        together = source.source_batch(baseline, batch, [10, 11, 12, 13])
        alone = source.source_batch(baseline, batch.select([2]), [12])
        n = int(alone.lengths[0])
        assert torch.equal(together.input_ids[2, :n], alone.input_ids[0, :n]), baseline
        other_stream = source.source_batch(baseline, batch, [10, 11, 12, 13], stream="text")
        assert not torch.equal(together.input_ids, other_stream.input_ids)


def test_counterfactual_needs_aligned_pairs_and_prompts():
    model = text_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    batch = encode(model, ["the cat", "a dog"])
    misaligned = BaselineSource(model, units, counterfactual_texts=["the cats", "a cow"])
    with pytest.raises(ReduceError, match="position-aligned"):
        misaligned.offsets(Baseline.RESAMPLE_COUNTERFACTUAL, batch, [0, 1])
    assert not misaligned.supports(Baseline.RESAMPLE_COUNTERFACTUAL, "text")
    with pytest.raises(ReduceError, match="counterfactual"):
        BaselineSource(model, units).offsets(Baseline.RESAMPLE_COUNTERFACTUAL, batch, [0, 1])


def test_constant_baselines_need_their_statistic_and_names_parse():
    model = text_model("gpt2")
    units = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    batch = encode(model, ["x"])
    with pytest.raises(ReduceError, match="peak_naive"):
        BaselineSource(model, units).offsets(Baseline.PEAK_NAIVE, batch, [0])
    assert Baseline.parse("resample_tokens") is Baseline.RESAMPLE_TOKENS
    with pytest.raises(ReduceError, match="unknown baseline 'median'"):
        Baseline.parse("median")
    assert Baseline.PEAK_NAIVE.label == "Peak" and Baseline.RESAMPLE_GENERATED.label == "RS3", "seed 004's names"


def test_unit_table_round_trips_through_xarray_and_scatters_subsets():
    model = tiny_model("gpt2")
    full = UnitTable.for_sites(model, resolve_sites(UNIT_SITES, model.n_layers))
    subset_rows = np.flatnonzero(full.index % 3 == 0)
    table = xr.Dataset(coords=full.coords()).isel(unit=subset_rows)
    subset = UnitTable.from_dataset(table)
    assert len(subset) == subset_rows.size and [s.name for s in subset.sites] == [s.name for s in full.sites]
    site = subset.sites[1]
    values = np.arange(len(subset), dtype=float) + 1
    spread = subset.scatter(values, site, model.n_units(site))
    assert np.count_nonzero(spread) == subset.rows(site).size
    assert np.array_equal(spread[subset.index[subset.rows(site)]], values[subset.rows(site)])
    gathered = subset.gather(torch.from_numpy(spread)[None], site)[0].numpy()
    assert np.array_equal(gathered, values[subset.rows(site)])
    with pytest.raises(ReduceError, match="unit table"):
        UnitTable.from_dataset(xr.Dataset({"x": ("row", [1])}))
