import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import reduce.record as record_module
from reduce.condition import load_condition
from reduce.errors import ReduceError
from reduce.record import record
from tests.tiny import tiny_text_model

ROOT = Path(__file__).resolve().parents[1]
CONDITION = """
name = "tiny"
[model]
name = "tiny"
[prompts]
template = "the {{subject}} near the {{place}}"
answer = "{{subject.verb}}"
wrong = "{{subject.wrong}}"
[prompts.slots]
subject = [ {{ text = "key", verb = "is", wrong = "are", number = "singular" }},
            {{ text = "dogs", verb = "are", wrong = "is", number = "plural" }},
            {{ text = "big cat", verb = "is", wrong = "are", number = "singular" }} ]
place = ["box", "big box", "big old red box", "table"]
[prompts.labels]
number = "{{subject.number}}"
[target]
kind = "logit_diff"
position = "{position}"
[record]
sites = ["blocks.*.mlp.hook_post", "blocks.*.attn.hook_z", "blocks.1.hook_resid_post"]
batch_size = {batch_size}
bins = 16
"""
TOKEN_FAMILIES = ["gpt2", "gpt_neox", "llama", "opt", "bert", "roberta"]


def tiny_condition(tmp_path, batch_size=4, position="last"):
    path = tmp_path / f"tiny_{batch_size}_{position}.toml"
    path.write_text(CONDITION.format(batch_size=batch_size, position=position))
    return load_condition(path)


def count_forwards(monkeypatch) -> list:
    calls = []
    real_forward = record_module.forward

    def counting(model, batch):
        calls.append(len(batch))
        return real_forward(model, batch)

    monkeypatch.setattr(record_module, "forward", counting)
    return calls


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_padded_batches_record_what_one_prompt_runs_do(tmp_path, family):
    model = tiny_text_model(family)
    single = record(tiny_condition(tmp_path, batch_size=1), tmp_path / "single", model=model, progress=False).load()
    padded = record(tiny_condition(tmp_path, batch_size=5), tmp_path / "padded", model=model, progress=False).load()
    assert len(set(single.length.values.tolist())) > 2, "prompts of several lengths"
    for name in [*padded.data_vars]:
        np.testing.assert_allclose(padded[name].values, single[name].values, atol=1e-5, rtol=0, err_msg=name)
    real = np.arange(padded.sizes["pos"]) < padded.length.values[:, None]
    assert np.isfinite(padded["target"].values[real]).all() and np.isnan(padded["target"].values[~real]).all()
    assert np.isnan(padded["blocks.0.mlp.hook_post"].values[~real]).all()


def test_layout_target_and_statistics(tmp_path):
    model = tiny_text_model("gpt2")
    dataset = record(tiny_condition(tmp_path), tmp_path / "run", model=model, progress=False)
    assert dict(dataset["blocks.0.attn.hook_z"].sizes) == {"prompt": 12, "pos": dataset.sizes["pos"], "head": 4, "d_head": 8}
    assert dataset["blocks.1.mlp.hook_post"].dims == ("prompt", "pos", "unit") and dataset["blocks.1.hook_resid_post"].dims[-1] == "d_model"
    assert dataset["blocks.1.mlp.hook_post"].attrs["layer"] == 1
    assert dataset.tokens.values[0, 1] == "key" and dataset.tokens.values[0, -1] == ""
    assert dataset.token_start.values[0, 1] == 4 and dataset.token_end.values[0, 1] == 7
    assert set(np.asarray(dataset.number.values).astype(object)) == {"singular", "plural"}
    last = dataset.length.values - 1
    mask = dataset.target_mask.values
    assert mask.sum() == 12 and mask[np.arange(12), last].all()
    # The logit difference recomputed by hand from the model's output, at every real position.
    with torch.no_grad():
        ids = model.tokenizer(list(dataset.text.values.astype(object)), padding=True, return_tensors="pt")
        logits = model.module(**ids).logits
    answer, wrong = dataset.answer_id.values, dataset.wrong_id.values
    expected = (logits[np.arange(12), :, answer] - logits[np.arange(12), :, wrong]).numpy()
    real = ~np.isnan(dataset.target.values)
    np.testing.assert_allclose(dataset.target.values[real], expected[:, : real.shape[1]][real], atol=1e-5)
    # stats.nc: the unit table of the unit sites, equal to statistics of the stored real tokens.
    stats = xr.load_dataset(tmp_path / "run" / "stats.nc")
    assert stats.sizes["unit"] == 2 * (128 + 32) and stats.attrs["bins"] == 16
    assert list(dict.fromkeys(stats.site.values.tolist())) == ["blocks.0.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
    values = dataset["blocks.1.mlp.hook_post"].values[real]
    rows = (stats.site == "blocks.1.mlp.hook_post").values
    np.testing.assert_allclose(stats["mean"].values[rows], values.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(stats["min"].values[rows], values.min(0))
    edges = stats.bin_lo.values[rows, None] + stats.bin_width.values[rows, None] * np.arange(17)
    for unit, histogram in enumerate(stats.histogram.values[rows]):
        np.testing.assert_array_equal(histogram, np.histogram(values[:, unit], edges[unit])[0])
    saved = load_condition(tmp_path / "run" / "condition.toml")
    assert saved.prompts == tiny_condition(tmp_path).prompts


def test_killed_run_resumes_and_finished_run_is_reused(tmp_path, monkeypatch):
    model = tiny_text_model("llama")
    condition = tiny_condition(tmp_path, batch_size=2)
    reference = record(condition, tmp_path / "reference", model=model, progress=False).load()
    checked = []

    def kill_at_third_batch(activations, resolved):
        checked.append(activations.index)
        if len(checked) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(record_module, "_check_finite", kill_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        record(condition, tmp_path / "run", model=model, progress=False)
    assert not (tmp_path / "run" / "activations.zarr").exists() and (tmp_path / "run" / ".activations.zarr.partial").exists()
    monkeypatch.undo()
    calls = count_forwards(monkeypatch)
    resumed = record(condition, tmp_path / "run", model=model, progress=False).load()
    assert len(calls) == 6 - 2, "only the batches the killed run did not finish"
    xr.testing.assert_allclose(resumed, reference, atol=1e-6)
    first, second = (xr.load_dataset(tmp_path / d / "stats.nc") for d in ("reference", "run"))
    np.testing.assert_array_equal(first.histogram.values, second.histogram.values)
    np.testing.assert_allclose(first["var"].values, second["var"].values, rtol=1e-9)
    calls.clear()
    record(condition, tmp_path / "run", model=model, progress=False)
    assert calls == []


def test_non_finite_activation_names_site_unit_and_prompt(tmp_path):
    model = tiny_text_model("gpt2")
    with torch.no_grad():
        model.layer(0).mlp.c_fc.weight[:, 5] = float("nan")
    with pytest.raises(ReduceError) as caught:
        record(tiny_condition(tmp_path), tmp_path / "run", model=model, progress=False)
    assert caught.value.field == "blocks.0.mlp.hook_post"
    assert "unit 5" in caught.value.message and "prompt 0 ('the key near the box')" in caught.value.message


def test_minilm_example_condition(tmp_path):
    condition = load_condition(ROOT / "conditions" / "minilm_neuron.toml")
    condition = dataclasses.replace(
        condition,
        prompts=dataclasses.replace(condition.prompts, max_prompts=12),
        record=dataclasses.replace(condition.record, batch_size=8, sites=("blocks.3.mlp.hook_post", "blocks.2.attn.hook_z")),
    )
    record(condition, tmp_path / "run", progress=False)
    dataset = xr.open_zarr(tmp_path / "run" / "activations.zarr")
    assert dataset.sizes["prompt"] == 12 and dataset.sizes["unit"] == 1536 and dataset.sizes["head"] == 12
    assert list(dataset.tokens.values[0, :2]) == ["[CLS]", "the"]
    neuron = dataset["blocks.3.mlp.hook_post"].isel(unit=750).values
    np.testing.assert_array_equal(dataset.target.values, neuron.astype(np.float64))
    assert dataset.target_mask.values[:, 2].all() and dataset.target_mask.values.sum() == 12
    stats = xr.load_dataset(tmp_path / "run" / "stats.nc")
    # Statistics skip [CLS] and [SEP]: two special tokens per prompt.
    assert stats.sizes["unit"] == 1536 + 384 and int(stats["count"][0]) == int(dataset.length.sum()) - 2 * 12
