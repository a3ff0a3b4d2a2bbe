"""The model zoo: its corpus, the shipped weights and cards, retraining, and its condition files."""

import json
import platform
import re
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reduce.zoo
from reduce.condition import load_condition
from reduce.errors import ReduceError
from reduce.models import load_model
from reduce.prompts import build_prompts
from reduce.zoo import (
    THRESHOLDS,
    ZOO_SPECS,
    corpus,
    evaluate,
    format_zoo_table,
    list_zoo,
    read_card,
    train,
    zoo_path,
)
from reduce.zoo.train import FAMILIES, build_tokenizer

CONDITIONS = Path(__file__).parents[1] / "conditions"
ZOO_BUDGET_MB = 40


def test_corpus_is_deterministic_and_seeded():
    assert list(islice(corpus.training_sentences(3), 300)) == list(islice(corpus.training_sentences(3), 300))
    assert list(islice(corpus.training_sentences(3), 300)) != list(islice(corpus.training_sentences(4), 300))
    assert corpus.heldout_filler(8) == corpus.heldout_filler(12)[:8]  # a sample is a prefix of the full set
    assert corpus.heldout_filler(8) != corpus.heldout_filler(8, seed=1)
    assert corpus.world(0) == corpus.world(0) and corpus.world(1) != corpus.world(0)
    assert corpus.heldout_twohop_prompts() == corpus.heldout_twohop_prompts()


def test_heldout_prompts_never_occur_in_training():
    world = corpus.world()
    heldout = {p.text for c in ("pp", "rc") for p in corpus.heldout_sva_prompts(c)}
    heldout |= {p.counterfactual for c in ("pp", "rc") for p in corpus.heldout_sva_prompts(c)}
    sizes = {len(text.split()) for text in heldout}
    twohop = re.compile(r"(\w+) \. the capital of that state is (\w+)")
    single_hop_cities, composed_cities = set(), set()
    for sentence in islice(corpus.training_sentences(0), 20_000):
        words = sentence.split()
        windows = {" ".join(words[i : i + n]) for n in sizes for i in range(len(words) - n + 1)}
        assert not windows & heldout, sentence
        composed_cities.update(city for city, _ in twohop.findall(sentence))
        if " is in " in sentence or "that state is" in sentence:
            single_hop_cities.add(words[0] if " is in " in sentence else words[3])
    assert composed_cities == set(world.training_cities)  # the composition is shown, but never for held-out cities
    assert single_hop_cities == set(world.cities)  # ... while every city's first hop is


def test_heldout_prompts_are_well_formed():
    tokenizer = build_tokenizer(corpus.CORPUS_SEED)
    vocabulary = set(corpus.vocabulary())
    prompts = [p for c in corpus.CONSTRUCTIONS for p in corpus.heldout_sva_prompts(c)] + corpus.heldout_twohop_prompts()
    for p in prompts:
        assert len(tokenizer(p.text)["input_ids"]) == len(tokenizer(p.counterfactual)["input_ids"]), p
        assert tokenizer(p.text)["input_ids"][0] == tokenizer.bos_token_id
        assert {p.answer, p.wrong} <= vocabulary and p.answer != p.wrong and p.text != p.counterfactual
        assert tokenizer.unk_token_id not in tokenizer(f"{p.text} {p.answer}")["input_ids"]
    capital_of_city = {p.labels["city"]: p.answer for p in corpus.heldout_twohop_prompts()}
    for p in corpus.heldout_twohop_prompts():
        counterfactual_city = p.counterfactual.split()[3]
        assert p.wrong == capital_of_city[counterfactual_city]  # the counterfactual's answer is this prompt's wrong one


def test_list_zoo_shows_every_model_within_budget():
    rows = list_zoo()
    assert [row["name"] for row in rows] == list(ZOO_SPECS)
    table = format_zoo_table(rows)
    assert all(name in table for name in ZOO_SPECS)
    assert sum(row["size_mb"] for row in rows) < ZOO_BUDGET_MB
    families = {row["family"] for row in rows}
    assert families == set(FAMILIES)


@pytest.mark.parametrize("name", list(ZOO_SPECS))
def test_shipped_weights_reproduce_their_card(name):
    card = read_card(name)
    assert card["meets_thresholds"] and card["spec"]["seed"] == ZOO_SPECS[name].seed
    recomputed = evaluate(name)
    assert recomputed == pytest.approx(card["metrics"], abs=1e-3)
    assert all(recomputed[key] >= minimum for key, minimum in THRESHOLDS.items())


def test_metrics_on_a_sample_match_the_card():
    card = read_card("gpt2-d128-s0")["metrics"]
    sampled = evaluate("gpt2-d128-s0", sample=16)
    assert all(sampled[key] >= minimum for key, minimum in THRESHOLDS.items())
    # The filler sample is the first 16 of the card's 64 texts.
    assert sampled["filler_top1"] == pytest.approx(card["filler_top1"], abs=0.05)
    assert sampled["filler_ce"] == pytest.approx(card["filler_ce"], abs=0.15)
    assert sampled["filler_ce"] != card["filler_ce"]  # it really is a smaller set


def test_zoo_folders_load_as_plain_transformers_models():
    import transformers

    fresh_tokenizer = json.loads(build_tokenizer(corpus.CORPUS_SEED).backend_tokenizer.to_str())
    for name, spec in ZOO_SPECS.items():
        folder = zoo_path(name)
        config = transformers.AutoConfig.from_pretrained(folder)
        assert config.model_type == spec.family and not list(folder.glob("*.bin"))
        assert json.loads((folder / "tokenizer.json").read_text()) == fresh_tokenizer  # no padding state saved
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_path("tiny"))
    module = transformers.AutoModelForCausalLM.from_pretrained(zoo_path("tiny"))
    batch = tokenizer(["the birds near the chair", "the bird"], padding=True, return_tensors="pt")
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.bos_token_id] * 2 and tokenizer.pad_token_id is not None
    logits = module(**batch).logits
    is_, are = tokenizer.convert_tokens_to_ids(["is", "are"])
    assert logits[0, 5, are] > logits[0, 5, is_] and logits[1, 2, is_] > logits[1, 2, are]


def test_retraining_tiny_reproduces_its_card(tmp_path):
    shipped = read_card("tiny")
    folder = train("tiny", out_dir=tmp_path / "tiny", progress=False)
    retrained = json.loads((folder / "card.json").read_text())
    assert retrained["metrics"] == pytest.approx(shipped["metrics"], abs=0.02)
    assert (folder / "tokenizer.json").read_text() == (zoo_path("tiny") / "tokenizer.json").read_text()
    same_setup = retrained["versions"] == shipped["versions"] and retrained["trained_on"] == shipped["trained_on"]
    if same_setup and platform.machine() == "x86_64":
        old, new = load_file(zoo_path("tiny") / "model.safetensors"), load_file(folder / "model.safetensors")
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
        assert retrained["metrics"] == shipped["metrics"]


def test_zoo_path_errors_name_the_field_and_known_models(tmp_path, monkeypatch):
    with pytest.raises(ReduceError) as error:
        zoo_path("gpt2-d999", source="run.toml", field="model.name")
    message = str(error.value)
    assert message.startswith("run.toml: model.name: unknown zoo model 'gpt2-d999'")
    assert all(name in message for name in ZOO_SPECS)
    with pytest.raises(ReduceError, match="model.name: unknown zoo model"):
        load_model("zoo:nope")
    with pytest.raises(ReduceError, match="neither a zoo model name"):
        evaluate(tmp_path)
    monkeypatch.setattr(reduce.zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ReduceError, match="has no weights"):
        zoo_path("tiny")


def _records(prompt_set) -> set:
    labels = prompt_set.labels
    return {
        (text, answer, wrong, counterfactual, *(labels[key][i] for key in sorted(labels)))
        for i, (text, answer, wrong, counterfactual) in enumerate(zip(prompt_set.texts, prompt_set.answers, prompt_set.wrongs, prompt_set.counterfactuals))
    }


def _corpus_records(prompts) -> set:
    return {(p.text, p.answer, p.wrong, p.counterfactual, *(p.labels[key] for key in sorted(p.labels))) for p in prompts}


def test_condition_files_hold_exactly_the_heldout_prompts():
    sva = load_condition(CONDITIONS / "sva.toml")
    every_sva = replace(sva, prompts=replace(sva.prompts, max_prompts=None))  # the file may sample its slot product
    heldout_sva = _corpus_records(p for c in corpus.CONSTRUCTIONS for p in corpus.heldout_sva_prompts(c))
    assert _records(build_prompts(every_sva)) == heldout_sva
    assert _records(build_prompts(sva)) <= heldout_sva
    assert _records(build_prompts(load_condition(CONDITIONS / "sva_tiny.toml"))) < heldout_sva
    twohop = load_condition(CONDITIONS / "twohop.toml")
    assert _records(build_prompts(twohop)) == _corpus_records(corpus.heldout_twohop_prompts())
    assert {c.model.name for c in (sva, twohop)} == {"zoo:gpt2-d128-s0"}
    tiny = load_model("zoo:tiny")
    for path in ("sva.toml", "sva_tiny.toml", "twohop.toml"):
        built = build_prompts(load_condition(CONDITIONS / path), tiny)  # one-token answers, equal-length counterfactuals
        assert len(built.answer_ids) == len(built)
